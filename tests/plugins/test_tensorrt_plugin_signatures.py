"""tensorrt.plugin's rules for the decorated plugin functions, checked on the source (no TensorRT here).

tensorrt.plugin (TensorRT 10.9 to 11.1, `tensorrt/plugin/_validate.py`) validates the functions given
to `register`, `autotune`, `impl` and `aot_impl` with `inspect.signature` and `issubclass` when
`register_plugins()` runs, so a violation surfaces only on a GPU host with TensorRT. The rules
checked here are those validators': annotations that are classes (not strings), tensors then
attributes in the registered order, the fixed trailing parameters, the return annotations, and the
exact plugin version the parser looks up.
"""

import ast
import pathlib

import pytest

import moec.plugins.tensorrt_plugin as tensorrt_plugin
from moec.targets.tensorrt.plugin_spec import PLUGIN

TREE = ast.parse(pathlib.Path(tensorrt_plugin.__file__).read_text())
ATTRIBUTE_TYPES = {"int", "float", "str", "bool", "bytes"}  # tensorrt.plugin's SERIALIZABLE_BUILTIN_TYPES
TRAILING = {"autotune": ["outputs"], "impl": ["outputs", "stream", "tactic"], "aot_impl": ["outputs", "tactic"]}
TENSOR_TYPE = {"register": "trtp.TensorDesc", "autotune": "trtp.TensorDesc", "impl": "trtp.Tensor",
               "aot_impl": "trtp.TensorDesc"}


def _decorated(kind: str) -> ast.FunctionDef:
    found = [f for f in ast.walk(TREE) if isinstance(f, ast.FunctionDef)
             for d in f.decorator_list
             if isinstance(d, ast.Call) and ast.unparse(d.func) == f"trtp.{kind}"]
    assert len(found) == 1, f"expected one @trtp.{kind} function, found {len(found)}"
    return found[0]


def _params(fn: ast.FunctionDef) -> list[tuple[str, str]]:
    return [(a.arg, ast.unparse(a.annotation) if a.annotation else "") for a in fn.args.args]


def _registered() -> tuple[list[str], dict[str, str]]:
    params = _params(_decorated("register"))
    tensors = [n for n, t in params if t == "trtp.TensorDesc"]
    return tensors, {n: t for n, t in params if n not in tensors}


def test_annotations_are_classes_not_strings():
    """`from __future__ import annotations` turns every annotation into a string; issubclass then raises."""
    future = [n for n in ast.walk(TREE) if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
    assert not future, "tensorrt_plugin.py must not postpone annotations (tensorrt.plugin evaluates them)"
    for kind in TENSOR_TYPE:
        fn = _decorated(kind)
        for a in fn.args.args + [ast.arg(arg="return", annotation=fn.returns)]:
            assert not (isinstance(a.annotation, ast.Constant) and isinstance(a.annotation.value, str)), \
                f"{fn.name}: annotation of '{a.arg}' is a string"


def test_register_matches_the_plugin_contract():
    fn = _decorated("register")
    assert not fn.args.defaults and not fn.args.kwonlyargs and fn.args.vararg is None
    params = _params(fn)
    tensors, attrs = _registered()
    assert [n for n, _ in params[:len(tensors)]] == tensors == list(PLUGIN.inputs)  # tensors first, in order
    assert list(attrs) == [name for name, _ in PLUGIN.fields]
    described = {"int": "int", "float": "float", "string": "str"}
    for name, desc in PLUGIN.fields:
        assert attrs[name] == described[desc.split()[0].rstrip(":,")], f"field '{name}': {attrs[name]} vs {desc}"
    assert set(attrs.values()) <= ATTRIBUTE_TYPES and not set(attrs) & {"outputs", "stream", "tactic"}
    assert ast.unparse(fn.returns) == "trtp.TensorDesc"  # one output
    # tensorrt.plugin registers every Python plugin as version "1"; the parser matches it exactly
    assert PLUGIN.version == "1"


@pytest.mark.parametrize("kind", ["autotune", "impl", "aot_impl"])
def test_implementations_follow_the_registered_schema(kind):
    """(tensors..., a subset of the attributes in registration order..., fixed trailing parameters)."""
    tensors, attrs = _registered()
    params = _params(_decorated(kind))
    names = [n for n, _ in params]
    assert names[:len(tensors)] == tensors
    used = names[len(tensors):len(names) - len(TRAILING[kind])]
    assert used == [a for a in attrs if a in used], f"{kind}: attributes out of registration order"
    assert names[len(names) - len(TRAILING[kind]):] == TRAILING[kind]
    for name, annotation in params:
        if name in tensors:
            assert annotation in ("", TENSOR_TYPE[kind]), f"{kind}: tensor '{name}' annotated {annotation}"
        elif name in attrs:
            assert annotation in ("", attrs[name]), f"{kind}: '{name}' is {annotation}, registered {attrs[name]}"
        elif name in ("stream", "tactic"):
            assert annotation in ("", "int")


def test_aot_impl_declares_its_return_tuple():
    """Required since 10.9: (kernel name, PTX, launch parameters, extra scalar arguments)."""
    returns = ast.unparse(_decorated("aot_impl").returns)
    assert returns == "Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]"


def test_impl_returns_nothing():
    assert _decorated("impl").returns is None
