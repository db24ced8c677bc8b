"""Text-only data for the long-context and compression work (issue 17), as LLaVA-JSON train / test pairs.

Never from a hub: each source is read from a folder the user points at, JSON only (nothing is
unpickled), every file resolved inside that folder (a symlink that leads out is refused), and every
record checked against its published schema with an error that names the file, the record and the key.

- **Super-NaturalInstructions** (``sni``): the task files of its ``tasks/`` folder (``task*.json``: a
  ``Definition`` (list of strings), ``Instances`` of ``{"id", "input", "output": [strings]}``). Each
  instance becomes ``{"text": input, human: "<text>\\n" + definition, gpt: output[0]}``.
- **LongBench v2** (``longbench``): its ``data.json`` (a list of ``{"_id", "domain", "sub_domain",
  "difficulty", "length", "question", "choice_A".."choice_D", "answer": "A".."D", "context"}``). Each item
  becomes ``{"text": context, human: "<text>\\n" + question + the four choices, gpt: the letter}``.
- **short math** (``math``): the seed's debug set, generated: ``"What is 37 + 5?"`` -> ``"42"`` (sums,
  differences and products of small numbers), text only.

The passage goes in the record's ``"text"`` field and reaches the LLM as a TEXT row at ``<text>`` (as the
pass-key task's). The split is deterministic: items sorted by id, shuffled by ``--seed``, the first
``--test-fraction`` (per task, for SNI) to the test split. Output: ``<out>/train.json``, ``test.json``,
``meta.json`` (counts, source, options) -- any eval or sweep that takes a LLaVA-JSON pair reads them.

    python -m llava_deft.tasks.long_text sni --src ~/natural-instructions --out data/sni --max-per-task 200
    python -m llava_deft.tasks.long_text longbench --src ~/LongBench-v2 --out data/longbench_v2
    python -m llava_deft.tasks.long_text math --out data/short_math --n-train 5000 --n-test 500
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

from ..errors import DatasetFormatError, TaskDataError

__all__ = ["convert_longbench", "convert_sni", "make_short_math", "main"]

CHOICES = ("A", "B", "C", "D")


def _inside(folder: Path, path: Path) -> Path:
    """``path`` resolved, refused unless it lies inside ``folder`` (``..``, symlinks)."""
    real = path.resolve()
    if real != folder and folder not in real.parents:
        raise DatasetFormatError(f"{path.relative_to(folder) if path.is_relative_to(folder) else path.name}: "
                                 f"leads outside the source folder {folder}; copy the file into it")
    return real


def _load_json(folder: Path, path: Path) -> Any:
    real = _inside(folder, path)
    if not real.is_file():
        raise TaskDataError(f"{path}: not a file; point --src at the dataset's folder")
    try:
        return json.loads(real.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        why = "nested too deeply to parse" if isinstance(e, RecursionError) else str(e)
        raise DatasetFormatError(f"{path}: not valid UTF-8 JSON ({why}); re-download the file") from None


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DatasetFormatError(f"{where} must be a non-empty string, got {type(value).__name__}")
    return value


def _split(items: list[dict], test_fraction: float, seed: int, cap: int | None = None) -> tuple[list[dict], list[dict]]:
    """Sorted by id, shuffled by ``seed``, the first ``cap`` kept, the first ``test_fraction`` of them to test."""
    items = sorted(items, key=lambda r: r["id"])
    random.Random(seed).shuffle(items)
    items = items[:cap] if cap is not None else items
    n_test = round(len(items) * test_fraction)
    return items[n_test:], items[:n_test]


def _record(sample_id: str, passage: str, prompt: str, answer: str) -> dict:
    return {"id": sample_id, "text": passage,
            "conversations": [{"from": "human", "value": f"<text>\n{prompt}"}, {"from": "gpt", "value": answer}]}


def _write(out: Path, train: list[dict], test: list[dict], meta: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for split, records in (("train", train), ("test", test)):
        (out / f"{split}.json").write_text(json.dumps(records, ensure_ascii=False))
    meta = {**meta, "train": len(train), "test": len(test)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")


def convert_sni(src: str | Path, out: str | Path, max_per_task: int | None = None, test_fraction: float = 0.1,
                seed: int = 0, tasks: list[str] | None = None) -> dict:
    """Super-NaturalInstructions task files of ``src`` (its ``tasks/`` folder, or ``src`` itself) -> ``out``.
    ``tasks``: task names to keep (file stems; default all); ``max_per_task``: the first that many instances
    of each task after the seeded shuffle. Returns the meta dict."""
    _check_fraction(test_fraction)
    folder = Path(src).expanduser().resolve()
    files_dir = folder / "tasks" if (folder / "tasks").is_dir() else folder
    files = sorted(files_dir.glob("task*.json"))
    if tasks is not None:
        wanted = set(tasks)
        missing = sorted(wanted - {f.stem for f in files})
        if missing:
            raise TaskDataError(f"{files_dir}: no task files {missing}")
        files = [f for f in files if f.stem in wanted]
    if not files:
        raise TaskDataError(f"{files_dir}: no task*.json files; point --src at a Super-NaturalInstructions checkout "
                            f"(its tasks/ folder)")
    train, test = [], []
    for path in files:
        task = _load_json(folder, path)
        name = path.stem
        if not isinstance(task, dict):
            raise DatasetFormatError(f"{path}: expected a task object, got {type(task).__name__}")
        definition = task.get("Definition")
        if isinstance(definition, list) and definition and all(isinstance(d, str) for d in definition):
            definition = "\n".join(definition)
        definition = _string(definition, f"{path}: key 'Definition'")
        instances = task.get("Instances")
        if not isinstance(instances, list):
            raise DatasetFormatError(f"{path}: key 'Instances' must be a list of instances")
        items = []
        for i, inst in enumerate(instances):
            where = f"{path}: key 'Instances[{i}]"
            if not isinstance(inst, dict):
                raise DatasetFormatError(f"{where}' must be an object with 'id', 'input' and 'output'")
            sample_id = _string(inst.get("id"), f"{where}.id'")
            passage = _string(inst.get("input"), f"{where}.input'")
            outputs = inst.get("output")
            if not isinstance(outputs, list) or not outputs:
                raise DatasetFormatError(f"{where}.output' must be a non-empty list of strings")
            answer = _string(outputs[0], f"{where}.output[0]'")
            items.append({"id": sample_id, "record": _record(f"{name}-{sample_id}", passage, definition, answer)})
        tr, te = _split(items, test_fraction, seed, max_per_task)
        train += [x["record"] for x in tr]
        test += [x["record"] for x in te]
    return _write(Path(out), train, test, {"source": "super-natural-instructions", "tasks": [f.stem for f in files],
                                            "max_per_task": max_per_task, "test_fraction": test_fraction, "seed": seed})


def convert_longbench(src: str | Path, out: str | Path, test_fraction: float = 0.5, seed: int = 0,
                      max_chars: int | None = None) -> dict:
    """LongBench v2's ``data.json`` (``src``: the file or its folder) -> ``out``. ``max_chars``: skip contexts
    longer than that (the 8K-32K-token subsets of a small model's reach); the skipped count is in the meta."""
    _check_fraction(test_fraction)
    given = Path(src).expanduser()
    folder = (given if given.is_dir() else given.parent).resolve()
    path = folder / "data.json" if given.is_dir() else folder / given.name
    data = _load_json(folder, path)
    if not isinstance(data, list):
        raise DatasetFormatError(f"{path}: expected a list of items (LongBench v2's data.json)")
    items, skipped = [], 0
    for i, item in enumerate(data):
        where = f"{path}: item {i}"
        if not isinstance(item, dict):
            raise DatasetFormatError(f"{where} must be an object")
        sample_id = _string(item.get("_id"), f"{where}: key '_id'")
        context = _string(item.get("context"), f"{where} (id {sample_id!r}): key 'context'")
        question = _string(item.get("question"), f"{where} (id {sample_id!r}): key 'question'")
        options = [_string(item.get(f"choice_{c}"), f"{where} (id {sample_id!r}): key 'choice_{c}'") for c in CHOICES]
        answer = item.get("answer")
        if answer not in CHOICES:
            raise DatasetFormatError(f"{where} (id {sample_id!r}): key 'answer' must be one of {list(CHOICES)}, "
                                     f"got {answer!r}")
        if max_chars is not None and len(context) > max_chars:
            skipped += 1
            continue
        prompt = question + "\n" + "\n".join(f"{c}. {o}" for c, o in zip(CHOICES, options)) + \
            "\nAnswer with the letter of the correct choice."
        items.append({"id": sample_id, "record": _record(f"longbench-{sample_id}", context, prompt, answer)})
    train, test = _split(items, test_fraction, seed)
    return _write(Path(out), [x["record"] for x in train], [x["record"] for x in test],
                  {"source": "longbench-v2", "test_fraction": test_fraction, "seed": seed, "max_chars": max_chars,
                   "skipped_longer": skipped})


def make_short_math(out: str | Path, n_train: int = 5000, n_test: int = 500, seed: int = 0, max_operand: int = 50) -> dict:
    """The seed's short-math debug set: ``What is a op b?`` -> the result, text only, no two questions alike
    across the splits (at most ``3 * (max_operand + 1) ** 2`` questions exist)."""
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    space = [(a, op, b) for a in range(max_operand + 1) for op in ops for b in range(max_operand + 1)]
    if n_train + n_test > len(space):
        raise ValueError(f"{n_train + n_test} questions asked, {len(space)} exist with operands up to {max_operand}")
    random.Random(seed).shuffle(space)

    def record(split: str, i: int, q: tuple) -> dict:
        a, op, b = q
        return {"id": f"math-{split}-{i:05d}", "conversations": [
            {"from": "human", "value": f"What is {a} {op} {b}?"}, {"from": "gpt", "value": str(ops[op](a, b))}]}

    train = [record("train", i, q) for i, q in enumerate(space[:n_train])]
    test = [record("test", i, q) for i, q in enumerate(space[n_train:n_train + n_test])]
    return _write(Path(out), train, test, {"source": "short-math (generated)", "seed": seed, "max_operand": max_operand})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_deft.tasks.long_text", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="source", required=True)
    sni = sub.add_parser("sni", help="Super-NaturalInstructions task files")
    sni.add_argument("--src", required=True)
    sni.add_argument("--tasks", nargs="+", default=None, help="task names (file stems); default all")
    sni.add_argument("--max-per-task", type=int, default=None)
    sni.add_argument("--test-fraction", type=float, default=0.1)
    lb = sub.add_parser("longbench", help="LongBench v2's data.json")
    lb.add_argument("--src", required=True)
    lb.add_argument("--max-chars", type=int, default=None)
    lb.add_argument("--test-fraction", type=float, default=0.5)
    math_p = sub.add_parser("math", help="the generated short-math debug set")
    math_p.add_argument("--n-train", type=int, default=5000)
    math_p.add_argument("--n-test", type=int, default=500)
    for sp in (sni, lb, math_p):
        sp.add_argument("--out", required=True)
        sp.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.source == "sni":
        meta = convert_sni(args.src, args.out, args.max_per_task, args.test_fraction, args.seed, args.tasks)
    elif args.source == "longbench":
        meta = convert_longbench(args.src, args.out, args.test_fraction, args.seed, args.max_chars)
    else:
        meta = make_short_math(args.out, args.n_train, args.n_test, args.seed)
    print(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
