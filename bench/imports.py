"""The import graph of `extract/` and `train/`, regenerable, and the import contract it must keep.

Prints which train module imports which extract module, the import circles, and which third-party libraries each
stage reaches. Every `import` and `from ... import` counts, at module level or inside a function (a lazy import is
still an edge the module needs to run). A circle is a strongly connected component of more than one module.
`--dot FILE` writes the graph in Graphviz's format (`dot -Tsvg FILE`); the last line is `key=value` pairs.

The import contract (`--check` exits 1 naming every breach; `make lint` runs it):
1. train/ imports from extract/ only the contract, `extract.contract.*`; the one exception is the console script
   `train.main`, which assembles both stages' commands.
2. The contract imports nothing else of extract/, nothing of train/, and none of torch, torchvision, open_clip,
   timm, av, faiss, dask.distributed (it is the schema, the store, the lock, the config loader, the CLI plumbing).
3. No train module imports open_clip, timm, av, faiss or dask.distributed (train.main included: it reaches the
   cluster code only through extract/scale.py).
4. extract/ never imports train/.
5. No import circles.

Usage: python bench/imports.py [--root .] [--dot imports.dot] [--check]
"""

from __future__ import annotations

import argparse
import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("extract", "train")
HEAVY = ("open_clip", "timm", "av", "faiss", "distributed", "dask.distributed")  # what stage 2 never imports
CONTRACT = "extract.contract"
CONSOLE = "train.main"  # the console script: the one train module that imports stage 1 beyond the contract
NOT_IN_CONTRACT = ("torch", "torchvision", *HEAVY)  # the contract is plain Python, numpy, zarr and yaml


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Absolute names of everything `path` (module `name`) imports, relative imports resolved."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..y import z
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import module` names the module, `from module import name` the module (longest match later)
            out.update(f"{prefix}.{alias.name}" for alias in node.names)
    return out


def graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between the packages' modules, third-party top-level names each module imports)."""
    files = {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    edges: dict[str, set[str]] = defaultdict(set)
    external: dict[str, set[str]] = defaultdict(set)
    for name, path in files.items():
        for target in imports_of(path, name):
            if target.split(".")[0] in packages:
                # the longest known module the name starts with (`from extract.config import Config` -> extract.config)
                parts = target.split(".")
                hit = next(
                    (".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in files), None
                )
                if hit is not None and hit != name:
                    edges[name].add(hit)
            else:
                external[name].add(target.split(".")[0])
                if target.startswith("dask.distributed"):
                    external[name].add("dask.distributed")
        edges.setdefault(name, set())
    return dict(edges), dict(external)


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out, key=lambda c: (-len(c), c))


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def breaches(edges: dict[str, set[str]], external: dict[str, set[str]]) -> list[str]:
    """Every breach of the import contract (see the module docstring), one sentence each."""
    out = []
    for m in sorted(edges):
        for t in sorted(edges[m]):
            if _in(m, "train") and _in(t, "extract") and not _in(t, CONTRACT) and m != CONSOLE:
                out.append(f"{m} imports {t}: train/ may import only {CONTRACT} (rule 1)")
            if _in(m, CONTRACT) and not _in(t, CONTRACT):
                out.append(f"{m} imports {t}: the contract imports nothing else of the project (rule 2)")
            if _in(m, "extract") and _in(t, "train"):
                out.append(f"{m} imports {t}: extract/ never imports train/ (rule 4)")
        libs = external.get(m, set())
        if _in(m, CONTRACT):
            out += [
                f"{m} imports {lib}: the contract imports no {lib} (rule 2)"
                for lib in sorted(set(NOT_IN_CONTRACT) & libs)
            ]
        if _in(m, "train"):
            out += [f"{m} imports {lib}: train/ never imports {lib} (rule 3)" for lib in sorted(set(HEAVY) & libs)]
    out += [f"import circle: {' <-> '.join(loop)} (rule 5)" for loop in circles(edges)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--dot", type=Path, default=None, help="write the graph for Graphviz here")
    ap.add_argument("--check", action="store_true", help="exit 1 when the import contract is broken")
    args = ap.parse_args(argv)
    edges, external = graph(args.root)
    cross = {m: sorted(t for t in ts if t.startswith("extract")) for m, ts in edges.items() if m.startswith("train")}
    cross = {m: ts for m, ts in cross.items() if ts}
    loops = circles(edges)
    heavy = {m: sorted(set(HEAVY) & libs) for m, libs in external.items() if m.startswith("train")}
    heavy = {m: libs for m, libs in heavy.items() if libs}
    print(f"{len(edges)} modules; train -> extract edges from {len(cross)} train modules:")
    for m, ts in sorted(cross.items()):
        print(f"  {m} -> {', '.join(ts)}")
    print(f"import circles: {len(loops)}")
    for loop in loops:
        print("  " + " <-> ".join(loop))
    print("train modules importing " + "/".join(HEAVY) + " directly:")
    for m, libs in sorted(heavy.items()):
        print(f"  {m}: {', '.join(libs)}")
    if args.dot:
        lines = ["digraph imports {", "  rankdir=LR;"]
        lines += [f'  "{a}" -> "{b}";' for a in sorted(edges) for b in sorted(edges[a])]
        args.dot.write_text("\n".join([*lines, "}"]) + "\n")
        print(f"wrote {args.dot}")
    broken = breaches(edges, external)
    print(f"import contract: {len(broken)} breach(es)")
    for b in broken:
        print(f"  {b}")
    targets = sorted({t for ts in cross.values() for t in ts})
    beyond = sorted({t for m, ts in cross.items() if m != CONSOLE for t in ts if not _in(t, CONTRACT)})
    print(
        f"modules={len(edges)} train_modules_importing_extract={len(cross)} extract_modules_imported_by_train="
        f"{len(targets)} beyond_contract={len(beyond)} circles={len(loops)} breaches={len(broken)}"
    )
    return 1 if args.check and broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
