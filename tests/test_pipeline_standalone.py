"""Layering pin: ``pipeline`` is a standalone library that never needs ``llava_deft`` (or the LLM stack)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
THIRD_PARTY = {"torch", "pydantic", "yaml", "typing_extensions", "annotated_types"}
FORBIDDEN = {"llava_deft", "transformers", "eval", "deepspeed"}
LAZY_ONLY = {"matplotlib"}  # a plotting method may import it inside the function (TOVA.visualize_head_weights)

SCRIPT = """
import sys
for name in {forbidden!r}:
    sys.modules[name] = None  # any import of these now raises ImportError
import torch
import pipeline
pipe = pipeline.build_pipeline("configs/pipeline/deft.yaml", dim=32).eval()
out = pipe(pipeline.TokenBatch.from_tokens(torch.randn(2, 64, 32), layout=(1, 8, 8)))
assert pipe.names == ["sam", "fgcs", "rtd"], pipe.names
assert out.tokens.shape == (2, 31, 32), out.tokens.shape  # ceil(0.482 * 64)
assert torch.isfinite(out.tokens).all()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {forbidden!r} and sys.modules[m] is not None)
assert not loaded, loaded
print("standalone ok")
"""


def test_pipeline_runs_without_llava_deft():
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(forbidden=sorted(FORBIDDEN))],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, f"pipeline needs a forbidden module:\n{res.stdout}\n{res.stderr}"
    assert "standalone ok" in res.stdout


def absolute_imports(path: Path, lazy_too: bool = True) -> list[tuple[int, str]]:
    """(line, top-level module) of every absolute import in a file; relative imports are skipped.
    ``lazy_too=False`` leaves out imports inside a function body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    lazy = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lazy |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if not lazy_too and id(node) in lazy:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def test_pipeline_imports_only_torch_pydantic_yaml_and_stdlib():
    files = sorted(PACKAGE.rglob("*.py"))
    assert {f.relative_to(ROOT).as_posix() for f in files} >= {
        "pipeline/__init__.py", "pipeline/batch.py", "pipeline/registry.py", "pipeline/stages/fgcs.py", "pipeline/stages/rtd.py",
    }
    allowed = THIRD_PARTY | set(sys.stdlib_module_names)
    eager = {(f, line, mod) for f in files for line, mod in absolute_imports(f, lazy_too=False)}
    bad = [f"{f.relative_to(ROOT)}:{line}: import {mod}" for f in files for line, mod in absolute_imports(f)
           if mod not in allowed and not (mod in LAZY_ONLY and (f, line, mod) not in eager)]
    assert not bad, "pipeline/ may import only torch, pydantic, yaml and the stdlib (matplotlib inside a plotting function):\n" + "\n".join(bad)
    assert not FORBIDDEN & allowed  # none of them can hide in the allowed set
