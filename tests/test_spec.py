"""The spec loader: built-in specs in both modes, the per-mode mapping, overrides, every input form, the
hash, the YAML round trip, and the structural errors (each naming where, the key and the fix)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sympy
import yaml

import attngen
from attngen.frontend.expr import HEAD, HEADS, KE, N_K, N_Q, QE, Dot, J, Sigmoid
from attngen.frontend.spec import RESERVED, spec_files

BUILTINS = attngen.builtin_names()
MODES = [True, False]
M = sympy.Symbol("M", real=True)
PM = sympy.Symbol("m", real=True)

SPECS = spec_files()[0].parent  # the built-in specs shipped in the package
COSFORMER_DICT = yaml.safe_load((SPECS / "cosformer.yaml").read_text())


def mode_id(causal):
    return "causal" if causal else "bidirectional"


# ---------------------------------------------------------------------------------------------
# Built-in specs
# ---------------------------------------------------------------------------------------------
def test_builtin_names_are_the_shipped_specs():
    assert BUILTINS == sorted(BUILTINS)
    assert {"alibi", "based", "cosformer", "cottention", "linear_elu", "polynomial2", "relu_linear",
            "retention", "softmax"} <= set(BUILTINS)


PAIRS = [pytest.param(s.name, s.causal, id=f"{s.name}-{s.mode}") for s in attngen.builtin_specs()]


def test_gated_builtins_are_causal_only_and_the_others_have_both_modes():
    for name in BUILTINS:
        spec = attngen.load_spec(name)
        assert attngen.spec_modes(name) == ((True,) if spec.gates else (True, False))
        if spec.gates:
            with pytest.raises(attngen.SpecError, match=r"gates: a gate on a bidirectional spec.*Fix: use the causal"):
                attngen.load_spec(name, causal=False)


@pytest.mark.parametrize("name,causal", PAIRS)
def test_every_builtin_loads_in_its_modes(name, causal):
    spec = attngen.load_spec(name, causal=causal)
    assert spec.name == name
    assert spec.causal is causal and spec.mode == mode_id(causal)
    assert isinstance(spec.similarity_expr, sympy.Expr) and isinstance(spec.reweight_expr, sympy.Expr)
    assert spec.where.startswith(name)
    # the math never refers to an undeclared symbol
    declared = {c.symbol for c in spec.constants} | {p.symbol for p in spec.parameters}
    builtins = {N_Q, N_K, HEAD, HEADS, sympy.Symbol("d", integer=True, positive=True)}
    rw_allowed = declared | builtins | {sympy.Symbol("i", integer=True, nonnegative=True), J}
    assert spec.reweight_expr.free_symbols <= rw_allowed
    assert spec.similarity_expr.free_symbols <= declared | builtins | {QE, KE}


SEED_MATH = [  # (name, similarity, normalize (kind, eps, eps_mode)) as docs/variants.md states them
    ("linear_elu", "dot(elu(q) + 1, elu(k) + 1)", ("rowsum", 1e-6, "add")),
    ("relu_linear", "dot(relu(q), relu(k))", ("rowsum", 1e-6, "clamp")),
    ("cosformer", "dot(relu(q), relu(k))", ("rowsum", 1e-6, "clamp")),
    ("softmax", "exp(dot(q, k)/sqrt(d))", ("rowsum", 0.0, "add")),
    ("polynomial2", "(dot(q, k)/sqrt(d))**2", ("rowsum", 1e-6, "add")),
    ("based", "1 + dot(q, k)/sqrt(d) + (dot(q, k)/sqrt(d))**2 / 2", ("rowsum", 1e-6, "add")),
    ("retention", "dot(q, k) / sqrt(d)", ("none", 0.0, "add")),
    ("cottention", "dot(q, k) / (max(norm(q), 1e-12) * max(norm(k), 1e-12))", ("none", 0.0, "add")),
    ("alibi", "exp(dot(q, k)/sqrt(d))", ("rowsum", 0.0, "add")),
]


@pytest.mark.parametrize("name,similarity,normalize", SEED_MATH, ids=[s[0] for s in SEED_MATH])
def test_builtin_matches_the_seed_math(name, similarity, normalize):
    spec = attngen.load_spec(name)
    assert spec.similarity == similarity
    assert (spec.normalize.kind, spec.normalize.eps, spec.normalize.eps_mode) == normalize


def test_builtin_constants_and_parameters():
    cos = attngen.load_spec("cosformer")
    assert cos.constant_values()[M] == sympy.Max(N_Q, N_K)
    ret = attngen.load_spec("retention")
    gamma = ret.constant_values()[sympy.Symbol("gamma", real=True)]
    assert gamma.subs(HEAD, 0) == 1 - sympy.Rational(1, 32)
    alibi = attngen.load_spec("alibi")
    (slope,) = alibi.parameters
    assert slope.shape == ("H",) and slope.init_expr.subs({HEAD: 0, HEADS: 8}) == sympy.Rational(1, 2)
    cot = attngen.load_spec("cottention")
    assert cot.param_names == ("m",) and cot.parameters[0].init_expr == sympy.Float(0.5)


# ---------------------------------------------------------------------------------------------
# The mode mapping {causal: ..., bidirectional: ...}
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal,expected", [(True, (J + 1) ** (-Sigmoid(PM))), (False, N_K ** (-Sigmoid(PM)))],
                         ids=["causal", "bidirectional"])
def test_cottention_reweight_follows_the_mode(causal, expected):
    spec = attngen.load_spec("cottention", causal=causal)
    assert spec.reweight_expr == expected
    assert spec.reweight == ("(j + 1)**(-sigmoid(m))" if causal else "n**(-sigmoid(m))")


@pytest.mark.parametrize("key", ["similarity", "normalize", "constants.M", "parameters.m.init"])
def test_mode_mapping_works_for_every_key(key):
    branches = {"similarity": ("dot(q, k)", "dot(relu(q), relu(k))"), "normalize": ("none", "rowsum"),
                "constants.M": ("1", "2"), "parameters.m.init": ("0.5", "0.25")}[key]
    mapping = {"causal": branches[0], "bidirectional": branches[1]}
    data = {"name": "t", "similarity": "dot(q, k)", "constants": {"M": 1}, "parameters": {"m": {"init": 0.5}}}
    if key == "constants.M":
        data["constants"] = {"M": mapping}
    elif key == "parameters.m.init":
        data["parameters"] = {"m": {"init": mapping}}
    else:
        data[key] = mapping
    picked = []
    for causal in (True, False):
        spec = attngen.load_spec(data, causal=causal)
        picked.append({"similarity": spec.similarity, "normalize": spec.normalize.kind,
                       "constants.M": spec.constants[0].source, "parameters.m.init": spec.parameters[0].init}[key])
    assert tuple(picked) == branches


def test_mode_mapping_missing_branch_and_unknown_branch():
    data = {"name": "t", "similarity": {"causal": "dot(q, k)"}}
    assert attngen.load_spec(data).similarity == "dot(q, k)"
    with pytest.raises(attngen.SpecError) as info:
        attngen.load_spec(data, causal=False)
    assert str(info.value) == ("<dict>: similarity: no branch for the bidirectional mode. "
                               "Fix: add 'bidirectional: ...' to the mapping")
    with pytest.raises(attngen.SpecError, match=r"similarity: mode mapping has unknown keys \['both'\]"):
        attngen.load_spec({"name": "t", "similarity": {"causal": "dot(q, k)", "both": "x"}})


# ---------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------
def test_override_constant_replaces_it():
    spec = attngen.load_spec("cosformer", M=4096)
    (m,) = spec.constants
    assert m.source == "4096" and spec.constant_values()[M] == 4096
    assert attngen.load_spec("cosformer", M="2 * n_q").constant_values()[M] == 2 * N_Q
    assert attngen.load_spec("cosformer").constant_values()[M] == sympy.Max(N_Q, N_K)  # the file is unchanged


def test_override_causal_and_top_level_keys():
    spec = attngen.load_spec("cosformer", causal=False)
    assert spec.causal is False and spec.mode == "bidirectional"
    spec = attngen.load_spec("cosformer", similarity="dot(q, k)", normalize="none")
    assert spec.similarity_expr == Dot(QE, KE) and spec.normalize.kind == "none"


def test_unknown_override_is_named():
    with pytest.raises(attngen.SpecError) as info:
        attngen.load_spec("cosformer", Q=3)
    msg = str(info.value)
    assert "unknown override(s) ['Q']" in msg
    assert "a declared constant (M)" in msg and msg.startswith("cosformer")


def test_override_is_validated_like_the_file():
    with pytest.raises(attngen.SpecError, match=r"constants.M: in 'i': 'i' is not allowed here"):
        attngen.load_spec("cosformer", M="i")
    with pytest.raises(attngen.SpecError, match=r"causal: found 'yes'; expected true or false"):
        attngen.load_spec("cosformer", causal="yes")


# ---------------------------------------------------------------------------------------------
# Input forms: YAML path, YAML string, dict, built-in name, Spec
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["builtin", "path", "str-path", "yaml-string", "dict", "spec"])
def test_every_input_form_gives_the_same_spec(tmp_path, form):
    expected = attngen.load_spec("cosformer")
    path = tmp_path / "cosformer.yaml"
    path.write_text(yaml.safe_dump(COSFORMER_DICT))
    source = {"builtin": "cosformer", "path": path, "str-path": str(path),
              "yaml-string": yaml.safe_dump(COSFORMER_DICT), "dict": dict(COSFORMER_DICT), "spec": expected}[form]
    spec = attngen.load_spec(source)
    assert spec == expected and spec.hash == expected.hash
    assert spec.where == {"builtin": expected.where, "path": str(path), "str-path": str(path),
                          "yaml-string": "<yaml string>", "dict": "<dict>", "spec": expected.where}[form]


def test_name_defaults_to_the_file_stem(tmp_path):
    path = tmp_path / "my_variant.yaml"
    path.write_text("similarity: dot(q, k)\n")
    assert attngen.load_spec(path).name == "my_variant"
    with pytest.raises(attngen.SpecError, match="<dict>: name: invalid name None"):
        attngen.load_spec({"similarity": "dot(q, k)"})


def test_parameters_as_a_list_and_defaults():
    spec = attngen.load_spec({"name": "t", "similarity": "dot(q, k)", "reweight": "g * s",
                              "parameters": [{"name": "g", "init": 1}, {"name": "s", "shape": [], "init": 2}]})
    assert [(p.name, p.shape, p.init) for p in spec.parameters] == [("g", ("H",), "1"), ("s", (), "2")]
    assert spec.reweight_expr == sympy.Symbol("g", real=True) * sympy.Symbol("s", real=True)
    assert spec.causal is True and spec.normalize == attngen.frontend.spec.Normalize("none", 0.0, "add")


# ---------------------------------------------------------------------------------------------
# Hash and YAML round trip
# ---------------------------------------------------------------------------------------------
def test_hash_is_stable_across_loads_and_processes():
    here = {name: attngen.load_spec(name).hash for name in BUILTINS}
    assert here == {name: attngen.load_spec(name).hash for name in BUILTINS}
    assert all(len(h) == 16 and int(h, 16) >= 0 for h in here.values())
    code = "import attngen; print({n: attngen.load_spec(n).hash for n in attngen.builtin_names()})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert out.stdout.strip() == str(here)


@pytest.mark.parametrize("change", [
    {"similarity": "dot(q, k)"}, {"reweight": "1"}, {"causal": False}, {"M": 4096}, {"normalize": "rowsum"},
    {"normalize": {"kind": "rowsum", "eps": 1e-5, "eps_mode": "clamp"}},
    {"normalize": {"kind": "rowsum", "eps": 1e-6, "eps_mode": "add"}}, {"name": "cosformer2"},
], ids=["similarity", "reweight", "causal", "constant", "normalize-kind", "eps", "eps-mode", "name"])
def test_hash_changes_when_the_spec_changes(change):
    assert attngen.load_spec("cosformer", **change).hash != attngen.load_spec("cosformer").hash


def test_hash_ignores_prose_and_origin():
    base = attngen.load_spec(dict(COSFORMER_DICT))
    assert attngen.load_spec(dict(COSFORMER_DICT, description="other words")).hash == base.hash
    assert attngen.load_spec("cosformer").hash == base.hash


@pytest.mark.parametrize("name,causal", PAIRS)
def test_to_yaml_round_trips(name, causal):
    spec = attngen.load_spec(name, causal=causal)
    text = spec.to_yaml()
    back = attngen.load_spec(text)
    assert back == spec and back.hash == spec.hash and back.description == spec.description
    assert back.similarity_expr == spec.similarity_expr and back.reweight_expr == spec.reweight_expr
    assert yaml.safe_load(text)["causal"] is causal  # the mode mapping is resolved in the output
    assert back.to_yaml() == text


def test_to_yaml_round_trips_an_override():
    spec = attngen.load_spec("cosformer", M=4096, causal=False)
    back = attngen.load_spec(spec.to_yaml())
    assert back == spec and back.constant_values()[M] == 4096 and back.causal is False


# ---------------------------------------------------------------------------------------------
# Structural errors: where, key, what was found, and what is expected
# ---------------------------------------------------------------------------------------------
GOOD = {"name": "t", "similarity": "dot(q, k)"}
STRUCT_ERRORS = [
    ("unknown-top-level-key", {"similarty": "dot(q, k)"}, None,
     ["unknown key(s) ['similarty']", "expected keys among name, description", "Fix: check the spelling"]),
    ("missing-similarity", {"similarity": None, "_drop": "similarity"}, None,
     ["missing key 'similarity'", "expected e.g. similarity: dot(q, k)"]),
    ("bad-normalize-kind", {"normalize": "layernorm"}, "normalize.kind",
     ["unknown kind 'layernorm'", "expected none or rowsum or softmax"]),
    ("normalize-not-mapping", {"normalize": [1, 2]}, "normalize", ["found [1, 2]", "expected none, rowsum, softmax"]),
    ("normalize-unknown-key", {"normalize": {"kind": "rowsum", "epsilon": 1}}, "normalize",
     ["unknown key(s) ['epsilon']", "expected kind, eps, eps_mode"]),
    ("negative-eps", {"normalize": {"kind": "rowsum", "eps": -1}}, "normalize.eps",
     ["eps -1", "expected a number in [0, 1000)"]),
    ("text-eps", {"normalize": {"kind": "rowsum", "eps": "tiny"}}, "normalize.eps",
     ["eps 'tiny'", "expected a number"]),
    ("bool-eps", {"normalize": {"kind": "rowsum", "eps": True}}, "normalize.eps", ["eps True", "expected a number"]),
    ("bad-eps-mode", {"normalize": {"kind": "rowsum", "eps": 1e-6, "eps_mode": "mul"}}, "normalize.eps_mode",
     ["eps_mode 'mul'", "expected add or clamp"]),
    ("eps-without-rowsum", {"normalize": {"kind": "softmax", "eps": 1e-6}}, "normalize",
     ["eps is only meaningful with kind rowsum, not softmax"]),
    ("bad-parameter-shape", {"parameters": {"g": {"shape": [3, 4], "init": 1}}}, "parameters.g.shape",
     ["shape [3, 4]", "expected [], [H], [Dk], [H, Dk], [F, Dk], [H, F, Dk] (F an integer or a numeric constant), "
      "or a table [H, NB] / [NB]"]),
    ("bad-parameter-shape-2d", {"parameters": {"g": {"shape": ["H", "H"], "init": 1}}}, "parameters.g.shape",
     ["shape ['H', 'H']", "expected [], [H], [Dk]"]),
    ("missing-init", {"parameters": {"g": {"shape": ["H"]}}}, "parameters.g",
     ["missing 'init'", "Fix: add e.g. init: 0.5"]),
    ("parameter-unknown-key", {"parameters": {"g": {"init": 1, "lr": 0.1}}}, "parameters.g",
     ["unknown key(s) ['lr']", "expected shape, init"]),
    ("scalar-parameter-uses-h", {"parameters": {"g": {"shape": [], "init": "h"}}}, "parameters.g.init",
     ["uses the head index h", "Fix: declare shape: [H]"]),
    ("parameter-list-item", {"parameters": [3]}, "parameters", ["item 0 is not a mapping with a 'name'"]),
    ("parameters-not-mapping", {"parameters": 3}, "parameters", ["found int", "expected a mapping name ->"]),
    ("constants-not-mapping", {"constants": [1]}, "constants", ["found list", "expected a mapping name ->"]),
    ("constant-and-parameter", {"constants": {"g": 1}, "parameters": {"g": {"init": 1}}}, "parameters.g",
     ["'g' is both a constant and a parameter"]),
    ("reserved-constant", {"constants": {"relu": 2}}, "constants.relu",
     ["'relu' is a reserved name", "Fix: choose another name (reserved:"]),
    ("reserved-parameter", {"parameters": {"n": {"init": 1}}}, "parameters.n", ["'n' is a reserved name"]),
    ("reserved-pi", {"constants": {"pi": 3}}, "constants.pi", ["'pi' is a reserved name"]),
    ("invalid-constant-name", {"constants": {"2x": 3}}, "constants.2x",
     ["invalid name '2x'", "expected an identifier such as 'gamma' or 'M'"]),
    ("bad-name", {"name": "my spec"}, "name", ["invalid name 'my spec'", "expected an identifier"]),
    ("causal-not-bool", {"causal": "yes"}, "causal", ["found 'yes'", "expected true or false"]),
    ("description-not-text", {"description": 3}, "description", ["description must be text"]),
    ("approx-not-mapping", {"approx": "fft"}, "approx", ["found 'fft'", "expected a mapping such as"]),
    ("approx-unknown-kind", {"approx": {"kind": "fft", "k": 8}}, "approx.kind",
     ["kind 'fft'", "expected conv_basis or topk_sparse"]),
    ("approx-k-zero", {"approx": {"kind": "conv_basis", "k": 0}}, "approx.k", ["k = 0", "expected an integer >= 1"]),
    ("approx-k-missing", {"approx": {"kind": "conv_basis"}}, "approx", ["missing 'k'", "Fix: add k:"]),
    ("approx-probe-zero", {"approx": {"kind": "conv_basis", "k": 2, "probe": 0}}, "approx.probe",
     ["probe = 0", "expected an integer >= 1"]),
    ("approx-delta-zero", {"approx": {"kind": "conv_basis", "k": 2, "delta": 0}}, "approx.delta",
     ["delta = 0", "expected a finite number > 0"]),
    ("approx-delta-negative", {"approx": {"kind": "conv_basis", "k": 2, "delta": -1.0}}, "approx.delta",
     ["delta = -1.0"]),
    ("approx-search", {"approx": {"kind": "conv_basis", "k": 2, "search": "random"}}, "approx.search",
     ["search = 'random'", "expected binary or scan"]),
    ("approx-unknown-key", {"approx": {"kind": "conv_basis", "k": 2, "probes": 3}}, "approx",
     ["unknown key(s) ['probes']"]),
    ("conv-basis-bidirectional", {"causal": False, "approx": {"kind": "conv_basis", "k": 2}}, "approx.kind",
     ["conv_basis needs a causal spec", "Fix: use causal: true"]),
    ("sparse-k-zero", {"approx": {"kind": "topk_sparse", "estimator": "cosformer", "k": 0}}, "approx.k",
     ["k = 0", "expected an integer >= 1"]),
    ("sparse-block-24", {"approx": {"kind": "topk_sparse", "estimator": "cosformer", "k": 2, "block": 24}},
     "approx.block", ["block = 24", "expected a power of two >= 16"]),
    ("sparse-block-8", {"approx": {"kind": "topk_sparse", "estimator": "cosformer", "k": 2, "block": 8}},
     "approx.block", ["block = 8", "expected an integer >= 16"]),
    ("sparse-no-estimator", {"approx": {"kind": "topk_sparse", "k": 2}}, "approx", ["missing 'estimator'"]),
    ("sparse-unknown-estimator", {"approx": {"kind": "topk_sparse", "estimator": "nope", "k": 2}},
     "approx.estimator", ["estimator 'nope' is not a built-in spec", "expected one of"]),
    ("sparse-bad-inline-estimator", {"approx": {"kind": "topk_sparse", "estimator": {"similarity": "dot(q,"}, "k": 2}},
     "approx.estimator", ["inline spec"]),
    ("sparse-keep", {"approx": {"kind": "topk_sparse", "estimator": "cosformer", "k": 2, "always_keep": {"last": 1}}},
     "approx.always_keep", ["expected a mapping {diagonal:"]),
    ("sparse-keep-first", {"approx": {"kind": "topk_sparse", "estimator": "cosformer", "k": 2,
                                      "always_keep": {"first": -1}}}, "approx.always_keep.first", ["first = -1"]),
]


@pytest.mark.parametrize("keys,key,hints", [c[1:] for c in STRUCT_ERRORS], ids=[c[0] for c in STRUCT_ERRORS])
def test_structural_error_names_file_key_and_fix(tmp_path, keys, key, hints):
    data = dict(GOOD)
    data.update({k: v for k, v in keys.items() if k != "_drop"})
    data.pop(keys.get("_drop", "-"), None)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(attngen.SpecError) as info:
        attngen.load_spec(path)
    msg = str(info.value)
    assert msg.startswith(str(path) + (f": {key}: " if key else ": ")), msg
    assert info.value.key == key
    for hint in hints:
        assert hint in msg, msg


def test_reserved_names_cover_symbols_and_functions():
    assert {"q", "k", "i", "j", "n", "n_q", "n_k", "d", "h", "H", "pi", "dot", "norm", "relu", "exp", "max"} <= RESERVED


@pytest.mark.parametrize("text,line", [("name: x\nsimilarity: [dot(q, k)\n", 3), ("name: x\n  bad: : :\n", 2),
                                       ("name: x\nsimilarity: 'dot(q, k)\n", 3), ("a: 1\n\t- b\n", 2)],
                         ids=["open-bracket", "bad-indent", "open-quote", "tab"])
def test_invalid_yaml_message_has_the_line(tmp_path, text, line):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    for source, where in ((path, str(path)), (text, "<yaml string>")):
        with pytest.raises(attngen.SpecError) as info:
            attngen.load_spec(source)
        msg = str(info.value)
        assert msg.startswith(f"{where}: invalid YAML at line {line}, column "), msg


@pytest.mark.parametrize("text,found", [("- a\n- b\n", "list"), ("just text\n", "str"), ("42\n", "int"),
                                        ("\n", "NoneType")], ids=["list", "str", "int", "empty"])
def test_non_mapping_document(tmp_path, text, found):
    path = tmp_path / "doc.yaml"
    path.write_text(text)
    with pytest.raises(attngen.SpecError) as info:
        attngen.load_spec(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: the document is a {found}; expected a mapping with keys name, description")


@pytest.mark.parametrize("source", ["nosuch", "nosuch.yaml", "specs/nosuch.yml", "x" * 5000],
                         ids=["name", "yaml", "yml-path", "name-too-long"])
def test_file_not_found_lists_builtin_names(source):
    with pytest.raises(attngen.SpecError) as info:
        attngen.load_spec(source)
    msg = str(info.value)
    assert "no spec file or built-in spec named" in msg
    assert "expected a YAML file path or one of " + ", ".join(BUILTINS) in msg
    assert "Fix: check the path, or run 'attngen list'" in msg


def test_unreadable_path_and_wrong_source_type(tmp_path):
    with pytest.raises(attngen.SpecError, match=r": cannot read the file"):
        attngen.load_spec(tmp_path)  # a directory
    with pytest.raises(attngen.SpecError, match=r"cannot load a spec from int; expected a path, a built-in name"):
        attngen.load_spec(3)


def test_errors_are_attngen_errors_not_tracebacks():
    with pytest.raises(attngen.AttngenError):
        attngen.load_spec({"name": "t", "similarity": "relu(q)"})
    assert not issubclass(attngen.SpecError, (ValueError, TypeError))


# ---------------------------------------------------------------------------------------------
# docs/specs.md stays true: every YAML block loads, and the built-in blocks match the shipped files
# ---------------------------------------------------------------------------------------------
DOC = Path(__file__).resolve().parents[1] / "docs" / "specs.md"


def doc_yaml_blocks():
    text = DOC.read_text()
    blocks, pos = [], 0
    while (start := text.find("```yaml\n", pos)) != -1:
        end = text.index("```", start + 8)
        para = text.rfind("\n\n", 0, start) + 2  # a built-in's block follows its paragraph '**name**: why'
        title = text[para + 2:text.index("**", para + 2)] if text.startswith("**", para) else ""
        blocks.append((title, yaml.safe_load(text[start + 8:end])))
        pos = end + 3
    return blocks


@pytest.mark.skipif(not DOC.is_file(), reason="docs/ is not shipped in the wheel")
def test_doc_yaml_blocks_load_and_builtins_match():
    blocks = doc_yaml_blocks()
    assert len(blocks) >= 12
    shown = set()
    for title, data in blocks:
        base = {"name": "doc", "parameters": {"m": 0.5}} | ({} if "terms" in data else {"similarity": "dot(q, k)"})
        spec = attngen.load_spec({**base, **data})
        assert isinstance(spec, attngen.Spec)
        if title in BUILTINS:
            shipped = yaml.safe_load((SPECS / f"{title}.yaml").read_text())
            assert data == {k: v for k, v in shipped.items() if k not in ("name", "description", "causal")}, title
            shown.add(title)
    assert shown == set(BUILTINS)


VARIANTS = DOC.parent / "variants.md"


@pytest.mark.skipif(not VARIANTS.is_file(), reason="docs/ is not shipped in the wheel")
def test_variants_doc_shows_every_shipped_spec_exactly():
    """docs/variants.md quotes each built-in's YAML file; the quotes stay equal to the shipped files."""
    text = VARIANTS.read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    shown = {b["name"]: b for b in blocks if isinstance(b, dict) and b.get("name") in BUILTINS}
    assert set(shown) == set(BUILTINS)
    for name, data in shown.items():
        assert data == yaml.safe_load((SPECS / f"{name}.yaml").read_text()), name
