"""Code generation: a Plan -> the text of one Triton module. The strict sympy -> Triton printer (printer), the
slots the templates are filled with (features, linear, quadratic), the renderer over the templates shipped in
codegen/templates (render), and what the generator expresses with its lowering passes (module)."""
