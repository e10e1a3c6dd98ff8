"""The pack's layering rules (docs/ARCHITECTURE.md §1-2), read from the source with `ast`: nothing
here imports the pack, so a rule broken by a module that does not even import still fails here.

- no import cycle among the pack's modules (relative imports resolved, imports inside functions
  and `import_in_pack("...")` launches count);
- wanvideo/ never imports multitalk/ or fp8_optimization.py, and the library (wanvideo/,
  multitalk/, fp8_optimization.py) never imports ComfyUI or the pack's nodes/;
- byte copies between devices happen only in wanvideo/placement.py;
- files stay under 500 lines and functions under 60.

Each list of exceptions below says why its entries are legitimate; a new occurrence anywhere else
fails. The TEMPORARY_* lists cover files another change is splitting up; they are to be emptied.
"""
from __future__ import annotations

import ast
import collections
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("wanvideo", "multitalk", "nodes")
TOP_MODULES = ("fp8_optimization.py", "__init__.py")
LIBRARY = ("wanvideo", "multitalk", "fp8_optimization")
COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths",
                   "latent_preview", "nodes", "node_helpers", "server", "execution"}

# Command line launchers (`python -m wanvideo.X`): they run only as __main__, nothing imports
# them, and as front ends they may compose wanvideo/ with multitalk/ like nodes/ does.
FRONT_ENDS = {
    "wanvideo.inspect": "hands the loader multitalk's InfiniteTalk injector",
    "wanvideo.make_tiny": "writes the full tiny set through multitalk.tiny.write_all_tiny_models",
    "wanvideo.make_full_size": "writes the full-size stand-ins through multitalk.stand_ins",
    "wanvideo.multi_gpu_worker": "runs one rank of multitalk.multi_gpu_worker (started per GPU)",
}

MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60
# Files being split by the BlockSwap refactor; whoever finishes it empties this.
TEMPORARY_SIZE_EXEMPTIONS: dict[str, str] = {}


# ----------------------------------------------------------------------------- reading the source

def pack_files() -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of the pack ('' is the pack's __init__)."""
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for name in TOP_MODULES:
        files["" if name == "__init__.py" else name[:-3]] = ROOT / name
    return files


MODULES = pack_files()
TREES = {name: ast.parse(path.read_text(encoding="utf-8"), str(path)) for name, path in MODULES.items()}


def rel(module: str) -> str:
    return MODULES[module].relative_to(ROOT).as_posix()


def _package_of(module: str) -> list[str]:
    parts = module.split(".") if module else []
    is_package = MODULES[module].name == "__init__.py"
    return parts if is_package else parts[:-1]


def _pack_target(parts: list[str]) -> str:
    """The most specific pack module that pack-relative `parts` name (a module, else its package)."""
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in MODULES:
            return ".".join(parts[:n])
    return ""


def _absolute(parts: list[str]) -> tuple[str, bool]:
    # Absolute names are top-level modules (`nodes` is ComfyUI's nodes.py); only the alias the
    # tests and tools load the pack under leads back into the pack.
    if parts[0] == "wanvideo_infinitetalk":
        return _pack_target(parts[1:]), True
    return parts[0], False


def _import_call(node: ast.Call) -> tuple[str, str] | None:
    """("import_in_pack" | "import_module", literal dotted name) for a call importing by name."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name in ("import_in_pack", "import_module") and node.args and \
            isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
        return name, node.args[0].value
    return None


def _targets(module: str, node: ast.AST) -> list[tuple[str, bool]]:
    if isinstance(node, ast.Import):
        return [_absolute(alias.name.split(".")) for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0:
        return [_absolute(node.module.split(".") + [alias.name]) for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        package = _package_of(module)
        base = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
        return [(_pack_target(base + [alias.name]), True) for alias in node.names]
    call = _import_call(node) if isinstance(node, ast.Call) else None
    if call is None:
        return []
    kind, dotted = call
    return [(_pack_target(dotted.split(".")), True) if kind == "import_in_pack"
            else _absolute(dotted.split("."))]


def imports(module: str) -> list[tuple[str, bool, int]]:
    """(target, inside the pack, line) for every import anywhere in `module` (inside functions
    too): a pack module's dotted name ('' for the pack's __init__), or an outside module's
    top-level name."""
    return [(target, inside, node.lineno) for node in ast.walk(TREES[module])
            for target, inside in _targets(module, node)]


def imports_of(source: str) -> list[tuple[str, bool]]:
    """imports() of `source` as if it were a module of wanvideo/ (to check the reader itself)."""
    TREES["wanvideo.__probe__"] = ast.parse(source)
    MODULES["wanvideo.__probe__"] = MODULES["wanvideo.loader"]
    try:
        return [(target, inside) for target, inside, _ in imports("wanvideo.__probe__")]
    finally:
        del TREES["wanvideo.__probe__"], MODULES["wanvideo.__probe__"]


def import_graph() -> dict[str, set[str]]:
    return {m: {t for t, inside, _ in imports(m) if inside and t != m} for m in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# ---------------------------------------------------------------------------------- (a) no cycles

def test_the_reader_sees_known_imports():
    graph = import_graph()
    assert "wanvideo.placement" in graph["wanvideo.loader"]          # `from . import placement`
    assert "wanvideo.quantize" in graph["fp8_optimization"]          # `from .wanvideo.quantize`
    assert "multitalk.inject" in graph["nodes.model_loader"]         # inside execute()
    assert "multitalk.tiny" in graph["wanvideo.make_tiny"]           # import_in_pack("...")
    assert "nodes" in graph[""]                                      # the entry point
    assert imports_of("import nodes\nimport folder_paths") == [("nodes", False),  # ComfyUI's
                                                                ("folder_paths", False)]
    assert imports_of("def f():\n    from ..multitalk import tiny\n    from . import nope") == \
        [("multitalk.tiny", True), ("wanvideo", True)]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_among_pack_modules():
    found = cycles(import_graph())
    assert not found, "import cycles (break them by moving the shared part below both): " + \
        "; ".join(" <-> ".join(c) for c in found)


# ------------------------------------------------------------------------------ (b) layering rules

def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_wanvideo_never_imports_multitalk_or_fp8_optimization():
    bad = sorted({f"{rel(m)}:{line} imports {target}"
                  for m in MODULES if _in(m, "wanvideo") and m not in FRONT_ENDS
                  for target, _, line in imports(m)
                  if _in(target, "multitalk", "fp8_optimization")})  # absolute ones too
    assert not bad, ("wanvideo/ is the ground floor: hand what it needs from above in as an "
                     "argument (see loader.load_model's inject). " + "; ".join(bad))


def test_front_ends_are_only_launchers():
    graph = import_graph()
    for module in FRONT_ENDS:
        assert module in MODULES, f"{module} no longer exists; drop it from FRONT_ENDS"
        assert not any(module in targets for targets in graph.values()), f"{module} is imported"


def test_library_never_imports_comfyui_or_nodes():
    bad = sorted({f"{rel(m)}:{line} imports {target}"
                  for m in MODULES if _in(m, *LIBRARY)
                  for target, inside, line in imports(m)
                  if (inside and _in(target, "nodes")) or (not inside and target in COMFYUI_MODULES)})
    assert not bad, "the library never imports ComfyUI; pass its pieces in as callables. " + \
        "; ".join(bad)


# ------------------------------------------------------------------------- (c) byte copies: placement

PLACEMENT = "wanvideo/placement.py"
# Receivers whose name says they are model state: a `.to(`/`.cuda(` on them copies weight bytes.
WEIGHT_NAME = re.compile(r"weight|param|buffer", re.IGNORECASE)

# (file, enclosing function, call) -> why it is not a weight moving between devices.
COPY_EXCEPTIONS = {
    ("wanvideo/model.py", "WanModel.patchify", "residual.copy_"):
        "fills the fp32 residual activation in the forward; same device",
    ("multitalk/wav2vec2.py", "Wav2Vec2Encoder.layer_outputs", "out[:, :, i].copy_"):
        "gathers one layer's hidden states (activations) into the encoder output",
    ("wanvideo/quant_linear.py", "QuantLinear.dequantized_weight", "self.weight.to"):
        "dtype cast for the dequantized compute path, on the layer's own device",
    ("wanvideo/quant_linear.py", "QuantLinear.dequantized_weight", "self.weight_scale.to"):
        "dtype cast of the scale for the same dequantization, on the layer's own device",
    ("wanvideo/quant_linear.py", "QuantLinear._forward_nvfp4_native", "(ga * self.weight_scale_2).to"):
        "dtype cast of a scalar product to the output dtype in the forward",
    ("wanvideo/head_exchange.py", "pack", "send[:, slot + i].copy_"):
        "writes q/k/v activations into the all-to-all send buffer (torch path); same device",
    ("wanvideo/head_exchange.py", "unpack", "out.view(b, n, world, pieces, h // (world * pieces), d).copy_"):
        "puts the received attention output (activations) in token order (torch path)",
    ("wanvideo/ulysses.py", "HeadExchange.attend", "got[p, me].copy_"):
        "this rank's own heads of the attention output (activations); same device",
    ("wanvideo/head_exchange.py", "pack", "own[:, slot:slot + len(tensors), me].copy_"):
        "this rank's own q/k/v slots into its receive buffer (torch path); same device",
    ("wanvideo/peer_copy.py", "CopyEngineLink.start", "self.slots[region][j][key(self.rank)].copy_"):
        "pushes all-to-all activations into a peer's mapped symmetric buffer (copy engine)",
}
# wanvideo/block_swap.py is being refactored elsewhere: its current copies, keyed by file and
# call, are allowed until that work routes them through placement and empties this list.
TEMPORARY_BLOCK_SWAP_COPIES: dict[str, list[str]] = {}


def _names(node: ast.AST) -> list[str]:
    """The names an expression is built from along its receiver chain (not call arguments)."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        return [node.attr] + _names(node.value)
    if isinstance(node, ast.Call):
        return _names(node.func)
    if isinstance(node, ast.Subscript):
        key = node.slice
        return _names(node.value) + ([key.value] if isinstance(key, ast.Constant)
                                     and isinstance(key.value, str) else [])
    if isinstance(node, ast.BinOp):
        return _names(node.left) + _names(node.right)
    return []


def _is_copy(call: ast.Call) -> bool:
    func = call.func
    if any(k.arg == "non_blocking" for k in call.keywords):
        return True
    if not isinstance(func, ast.Attribute):
        return False
    if func.attr == "copy_":
        return True
    names = _names(func.value)
    return func.attr in ("to", "cuda") and (any(WEIGHT_NAME.search(n) for n in names)
                                            or (names[:1] == ["data"]))


def copies(module: str) -> list[tuple[str, str, int]]:
    """(enclosing function, call, line) for each copy-like call in `module`."""
    found = []

    def visit(node, scope):
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = scope + [child.name]
            if isinstance(child, ast.Call) and _is_copy(child):
                found.append((".".join(scope) or "<module>", ast.unparse(child.func), child.lineno))
            visit(child, inner)

    visit(TREES[module], [])
    return found


def test_the_copy_reader_sees_weight_copies():
    source = ("def f(m, w, x, dst):\n    m.weight.to('cuda')\n    p.data.to(0)\n"
              "    x.to('cuda')\n    dst.copy_(w)\n    x.float().to(dev, non_blocking=True)\n"
              "    m.dequantized_weight(torch.float32).to(dev)\n    F.rms_norm(x, m.weight).to(x)\n")
    TREES["__probe__"] = ast.parse(source)
    try:
        assert [c for _, c, _ in copies("__probe__")] == [
            "m.weight.to", "p.data.to", "dst.copy_", "x.float().to",
            "m.dequantized_weight(torch.float32).to"]
    finally:
        del TREES["__probe__"]
    assert any(call == "out.copy_" for _, call, _ in copies("wanvideo.placement"))


def test_byte_copies_between_devices_only_in_placement():
    allowed = collections.Counter(COPY_EXCEPTIONS.keys())
    temporary = {f: collections.Counter(calls) for f, calls in TEMPORARY_BLOCK_SWAP_COPIES.items()}
    seen, bad = collections.Counter(), []
    for module in MODULES:
        path = rel(module)
        if path == PLACEMENT:
            continue
        for scope, call, line in copies(module):
            if path in temporary and temporary[path][call] > 0:
                temporary[path][call] -= 1
            elif allowed[(path, scope, call)] > seen[(path, scope, call)]:
                seen[(path, scope, call)] += 1
            else:
                bad.append(f"{path}:{line} {scope}: {call}(...)")
    assert not bad, ("weights change device only through wanvideo/placement.py (fresh_copy, "
                     "set_tensor, move_module, ...); if this is an activation or a dtype cast, "
                     "add it to COPY_EXCEPTIONS with the reason: " + "; ".join(bad))
    stale = sorted(set(allowed) - set(seen))
    assert not stale, f"COPY_EXCEPTIONS entries no longer in the code, remove them: {stale}"


# --------------------------------------------------------------------------------- (d) sizes

def _functions(tree: ast.AST, scope=()):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield ".".join(scope + (node.name,)), node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield from _functions(node, scope + (node.name,))


def _size_checked() -> list[str]:
    return [m for m in MODULES if _in(m, *PACKAGES, "fp8_optimization")
            and rel(m) not in TEMPORARY_SIZE_EXEMPTIONS]


def test_no_file_over_500_lines():
    long = {rel(m): n for m in _size_checked()
            if (n := len(MODULES[m].read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES}
    assert not long, f"split these by topic (one thing per file): {long}"


def test_no_function_over_60_lines():
    long = [f"{rel(m)}:{node.lineno} {name} ({node.end_lineno - node.lineno + 1} lines)"
            for m in _size_checked() for name, node in _functions(TREES[m])
            if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
            and node.name != "define_schema"]  # node schemas are declarative boilerplate
    assert not long, "split these into named steps: " + "; ".join(long)
