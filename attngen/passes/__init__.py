"""The compiler's passes over the draft IR (attngen.passes.draft.Draft), listed in order in attngen.pipeline:
frontend (expressions in, constants out, softmax canonicalised), planning (rewrite: separate and classify;
the linear terms; approximate; cost; choose; capabilities)."""
