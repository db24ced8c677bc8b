"""The package's rooms and which way imports go (DESIGN.md's layering table, README's Layout).

Every import statement of ``llava_deft/``, ``pipeline/`` and ``eval/`` (module level or inside a
function: a deferred import is still an arrow) is read from the source, relative imports resolved.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

ROOMS = ["errors", "_lazy", "provenance", "config", "encoders", "modality", "model", "tasks", "data", "train",
         "overlay", "inference", "evaluation", "viewer", "cli"]
"""``llava_deft``'s rooms, lowest first: a module may import only its own room and rooms before it."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of the project modules ``path`` imports (``from a import b`` yields ``a.b`` when
    ``a/b.py`` exists, else ``a``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t.split(".")[0] in ("llava_deft", "pipeline", "eval")}
    out.discard(name)
    return out


def is_module(name: str) -> bool:
    p = REPO.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    files = [p for top in ("llava_deft", "pipeline", "eval") for p in (REPO / top).rglob("*.py")]
    return {module_name(p): imports_of(p) for p in files}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def test_the_graph_sees_the_imports_it_should():
    g = graph()
    assert "llava_deft.modality" in g["llava_deft.model.llava"]
    assert "llava_deft.data.records" in g["llava_deft.data.passkey"]  # relative import resolved
    assert "pipeline.batch" in g["pipeline.stages.fgcs"]


def test_no_import_cycle_in_the_project():
    g = graph()
    seen, on_stack, cycles = set(), [], []

    def visit(m):
        seen.add(m)
        on_stack.append(m)
        for n in sorted(g.get(m, ())):
            if n in on_stack:
                cycles.append(on_stack[on_stack.index(n):] + [n])
            elif n not in seen and n in g:
                visit(n)
        on_stack.pop()

    for m in sorted(g):
        if m not in seen:
            visit(m)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_room_imports_only_rooms_below_it():
    g = graph()
    rooms = {room(m) for m in g if m.startswith("llava_deft.")}
    assert rooms - {"<root>"} <= set(ROOMS), f"a room is missing from ROOMS: {sorted(rooms - set(ROOMS))}"
    upward = [
        f"{m} -> {n}"
        for m, targets in g.items() if m.startswith("llava_deft.") and room(m) != "<root>"
        for n in targets if n.startswith("llava_deft.") and room(n) != "<root>"
        if ROOMS.index(room(n)) > ROOMS.index(room(m))
    ]
    assert upward == []


def test_pipeline_never_imports_llava_deft_and_llava_deft_never_imports_eval():
    g = graph()
    bad = [f"{m} -> {n}" for m, targets in g.items() for n in targets
           if (m.startswith("pipeline") and not n.startswith("pipeline")) or (m.startswith("llava_deft") and n.startswith("eval"))]
    assert bad == []


def test_config_room_imports_only_pydantic_yaml_errors_and_pipeline():
    third_party = defaultdict(set)
    for p in (REPO / "llava_deft" / "config").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for n in names:
                top = n.split(".")[0]
                if top not in sys.stdlib_module_names:
                    third_party[top].add(p.name)
    assert set(third_party) <= {"pydantic", "yaml", "pipeline"}, dict(third_party)


@pytest.mark.parametrize("module", ["llava_deft.model.llm", "llava_deft.config"])
def test_light_rooms_import_without_vision_or_video_libraries(module):
    """``llava_deft.model.llm`` runs on a bare GPU box (torch + transformers); configs validate without encoders."""
    blocked = ["timm", "open_clip", "decord", "deepspeed", "easy_vqa", "av"]
    code = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); import {module}; "
            f"print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_no_source_file_of_the_package_is_git_ignored():
    """A fresh clone must hold every module (an ignore rule such as ``data/`` once hid ``llava_deft/data/``)."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "--others", "--ignored", "--exclude-standard", "llava_deft", "pipeline", "eval"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert [p for p in out if p.endswith((".py", ".yaml", ".json")) and "__pycache__" not in p] == []
