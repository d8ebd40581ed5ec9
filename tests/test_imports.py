"""The package's import graph has no circle: every `import` of a leapalign_fast module, at module level or inside
a function (a lazy import is a dependency too), read with `ast` from the source."""

import ast
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "leapalign_fast"


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, packages by their `__init__.py` (leapalign_fast/kernels, a link to ../kernels,
    included)."""
    out = {}
    for path in (Path(d) / f for d, _, files in os.walk(root, followlinks=True) for f in files if f.endswith(".py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules `name` imports (`from a.b import c`: a.b.c when that is a module, else a.b)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package `level - 1` steps up
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out |= {full} if full in known else ({base} if base in known else set())
    return out - {name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (or a module importing itself)."""
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(node, path):
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                found.append(path[path.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, path)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_circle_among_the_package_modules():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert "leapalign_fast.rewards" in graph["leapalign_fast.train"]  # the graph is read (a broken parser finds none)
    assert cycles(graph) == []


def test_kernels_import_nothing_above_them():
    """kernels/ is the bottom layer: its modules import each other only."""
    known = modules()
    kernel_modules = {n for n in known if n.startswith("leapalign_fast.kernels.")}
    assert {"leapalign_fast.kernels.connector", "leapalign_fast.kernels.similarity"} <= kernel_modules
    assert "leapalign_fast.kernels.connector" in imports("leapalign_fast.flow", known["leapalign_fast.flow"], known)
    for name in kernel_modules:
        assert imports(name, known[name], known) <= kernel_modules, name


# The layers, bottom first (a module's layer is that of its longest matching prefix). A module may import from its
# own layer and the ones below: the trainer, checkpointer, config, backbone, method and reward are separate rooms
# whose imports point down only.
LAYERS = [
    [
        "leapalign_fast.kernels",
        "leapalign_fast.errors",
        "leapalign_fast.io",
        "leapalign_fast.dtypes",
        "leapalign_fast.threads",
        "leapalign_fast.methods.settings",
        "leapalign_fast.hub",
    ],
    ["leapalign_fast.config"],
    [
        "leapalign_fast.flow",
        "leapalign_fast.ema",
        "leapalign_fast.images",
        "leapalign_fast.runlock",
        "leapalign_fast.resume_settings",
        "leapalign_fast.prompts",
        "leapalign_fast.fsdp",
        "leapalign_fast.recompute",
        "leapalign_fast.dist_checkpoint",
        "leapalign_fast.model_dir",
        "leapalign_fast.blocks",
        "leapalign_fast.trackers",
    ],
    ["leapalign_fast.sampler", "leapalign_fast.models", "leapalign_fast.rewards", "leapalign_fast.toy"],
    ["leapalign_fast.methods", "leapalign_fast.preflight"],
    ["leapalign_fast.build"],
    ["leapalign_fast.checkpoint", "leapalign_fast.validation", "leapalign_fast.evaluate"],
    ["leapalign_fast.train", "leapalign_fast.doctor", "leapalign_fast.doctor_machine", "leapalign_fast.doctor_job"],
    ["leapalign_fast.cli", "leapalign_fast"],
]


def layer(name: str) -> int:
    best = max((p for ps in LAYERS for p in ps if name == p or name.startswith(p + ".")), key=len)
    return next(i for i, ps in enumerate(LAYERS) if best in ps)


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, deps in graph.items() for b in deps if layer(b) > layer(a))


def test_imports_point_down_the_layers_only():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert all(layer(n) >= 0 for n in graph)  # every module has a layer
    assert upward(graph) == []
    graph["leapalign_fast.methods.base"].add("leapalign_fast.train")  # the check can fail
    assert upward(graph) == [("leapalign_fast.methods.base", "leapalign_fast.train")]


def test_the_config_layer_needs_no_torch():
    """config.py and methods/settings.py type a whole config before any heavy import."""
    for name in ("config.py", "methods/settings.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        heavy = [
            n
            for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom))
            and any(
                a.name.split(".")[0] in ("torch", "numpy", "diffusers", "transformers", "accelerate")
                for a in (n.names if isinstance(n, ast.Import) else [ast.alias(n.module or "")])
            )
        ]
        assert not heavy, name
