"""attngen's benchmarks: measurements of the compiled ops on this machine, written as markdown tables to
bench/results/ (each names its machine, command and date). Not part of the attngen package: run them from the
repository root as

    python -m benchmarks linear | decode | sparse | conv-basis | conv-basis-error | toeplitz [options]

(``python -m benchmarks --help`` lists them). Modules: ``common`` (causal linear scaling, decode, the shared
subprocess and report helpers), ``conv_basis``, ``sparse``, ``toeplitz``, and ``realdata`` (the q, k, v of
all-MiniLM-L6-v2 on real text, an optional dependency: ``bash scripts/setup_bench.sh``). Each measurement that
reports memory runs in its own subprocess, ``python -m benchmarks.<module> ...`` with the repository root on
PYTHONPATH. They use attngen's public API (attngen.compile, attngen.reference, attngen.load_spec, op.plan) and
a few internal names kept for them (attngen.pipeline.plan, attngen.approx.topk_sparse.selection, attngen.ir,
attngen.runtime.state.check_decodable).
"""
