"""The boundary between the stages: stage 2 (train/) runs without stage 1's libraries, and reaches stage 1 only
through its contract (extract/contract/).

At run time: a fresh interpreter in which open_clip, timm, av, faiss, dask.distributed (distributed) and torchvision
cannot be imported imports every module of train/ but the console script, writes a cache store through the contract
and trains every registered head on it for an epoch; none of those libraries is loaded at the end. Statically:
bench/imports.py's import graph of the tree keeps the contract's rules."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BLOCKED = ("open_clip", "timm", "av", "faiss", "distributed", "dask.distributed", "torchvision")

SCRIPT = r"""
import importlib
import importlib.abc
import json
import pkgutil
import sys
import traceback
from pathlib import Path

repo, out, blocked = Path(sys.argv[1]), Path(sys.argv[2]), tuple(sys.argv[3].split(","))


class Blocked(importlib.abc.MetaPathFinder):
    # stage 1's libraries are not installed here: an import of one fails, naming it and the project lines importing it

    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in blocked):
            chain = [f"{Path(f.filename).relative_to(repo)}:{f.lineno}" for f in traceback.extract_stack()[:-1]
                     if f.filename.startswith(str(repo))]
            raise ImportError(f"{name} is not importable in stage 2 (imported by {' <- '.join(reversed(chain))})")
        return None


sys.meta_path.insert(0, Blocked())

import train

assert Path(train.__file__).is_relative_to(repo), train.__file__  # this checkout's train/, not an installed one


def refuse(name):
    raise ImportError(f"importing {name} failed: {sys.exc_info()[1]}")


modules = [m.name for m in pkgutil.walk_packages(train.__path__, "train.", onerror=refuse)]
for name in sorted(modules):
    if name != "train.main":  # the console script: it assembles stage 1's commands too
        importlib.import_module(name)

from extract.contract.config import load_config
from tests.train.random_cache import write_random_cache
from train.engine import train as train_run
from train.heads import head_names

cache = write_random_cache(out / "cache")
runs = {}
for head in head_names():
    overrides = [f"train.head={head}", "train.epochs=1", "train.batch_size=8", f"train.runs_root={out / 'runs'}"]
    cfg = load_config(repo / "pipeline.yaml", overrides)
    result = train_run(cfg, store=cache.store, progress=False)
    runs[head] = {"run_dir": str(result.run_dir), "steps": result.steps, "metrics": result.metrics}
loaded = [b for b in blocked if b in sys.modules]
refused = {}  # the control: each library is installed, and importing it here fails
for b in blocked:
    try:
        importlib.import_module(b)
    except ImportError as e:
        refused[b] = str(e)
print(json.dumps({"modules": modules, "runs": runs, "loaded": loaded, "refused": refused}))
"""


def test_stage_2_imports_trains_and_evaluates_without_stage_1s_libraries(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(REPO), str(tmp_path), ",".join(BLOCKED)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    from train.heads import head_names

    assert {"train.engine", "train.ablate", "train.cli", "train.heads.pcmci"} <= set(report["modules"])
    assert set(report["runs"]) == set(head_names())
    for head, run in report["runs"].items():
        run_dir = Path(run["run_dir"])
        assert run["steps"] == 2 and (run_dir / "last.pt").exists() and (run_dir / "best.pt").exists(), head
        assert set(run["metrics"]) == {"test_iid", "test_ood"}, head
    assert report["loaded"] == []  # none of stage 1's libraries was loaded on the way
    assert sorted(report["refused"]) == sorted(BLOCKED)  # while each import of one would have failed, naming it
    assert all(msg.startswith(f"{name} is not importable") for name, msg in report["refused"].items())


def test_import_graph_finds_cross_stage_edges_circles_and_breaches(tmp_path, capsys):
    """bench/imports.py on a made-up tree with a known answer: a lazy import inside a function, a relative import,
    `from pkg import module`, one circle of three extract modules, and one breach of each contract rule beside the
    edges the contract allows (train -> the contract, the console script train.main -> stage 1)."""
    from bench import imports

    files = {
        "extract/__init__.py": "",
        "extract/a.py": "from extract import b\n",
        "extract/b.py": "def f():\n    from .c import x\n    import faiss\n",
        "extract/c.py": "import extract.a\nx = 1\n",
        "extract/d.py": "import numpy\n",
        "extract/e.py": "import train.u\n",  # rule 4
        "extract/contract/__init__.py": "",
        "extract/contract/s.py": "import torch\nfrom extract import d\nimport yaml\n",  # rule 2, twice
        "train/__init__.py": "",
        "train/t.py": "import torch\nfrom extract.d import thing\nfrom . import u\n",  # rule 1
        "train/u.py": "def g():\n    import av\n",  # rule 3
        "train/v.py": "from extract.contract import s\nfrom dask.distributed import Client\n",  # rule 3
        "train/main.py": "import extract.a\n",  # allowed: the console script
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    edges, external = imports.graph(tmp_path)
    assert edges["extract.b"] == {"extract.c"} and edges["train.t"] == {"extract.d", "train.u"}
    assert imports.circles(edges) == [["extract.a", "extract.b", "extract.c"]]
    assert external["extract.b"] == {"faiss"} and external["train.u"] == {"av"}
    assert imports.breaches(edges, external) == [
        "extract.contract.s imports extract.d: the contract imports nothing else of the project (rule 2)",
        "extract.contract.s imports torch: the contract imports no torch (rule 2)",
        "extract.e imports train.u: extract/ never imports train/ (rule 4)",
        "train.t imports extract.d: train/ may import only extract.contract (rule 1)",
        "train.u imports av: train/ never imports av (rule 3)",
        "train.v imports dask.distributed: train/ never imports dask.distributed (rule 3)",
        "import circle: extract.a <-> extract.b <-> extract.c (rule 5)",
    ]
    assert imports.main(["--root", str(tmp_path), "--dot", str(tmp_path / "g.dot")]) == 0  # reports, no --check
    assert imports.main(["--root", str(tmp_path), "--check"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (
        "modules=13 train_modules_importing_extract=3 extract_modules_imported_by_train=3 beyond_contract=1 "
        "circles=1 breaches=7"
    )
    assert '"train.t" -> "extract.d";' in (tmp_path / "g.dot").read_text()


def test_the_project_keeps_its_import_contract():
    """The real tree: train/ reaches stage 1 only through extract.contract (and the console script), the contract
    imports no library of the encoders, decoders or the cluster, and no module is in an import circle."""
    from bench import imports

    edges, external = imports.graph(imports.ROOT)
    assert imports.breaches(edges, external) == []
    assert any(t.startswith("extract.contract") for t in edges["train.engine"])  # the graph sees the real edges
