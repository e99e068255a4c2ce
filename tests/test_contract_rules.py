"""House rules of the package, read from its source: one home for the LoRA names, no import circle."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lora_export"
CONTRACT = PACKAGE / "contract"  # the package

# What only lora_export/contract/ may spell: tensor names (`.lora_A.weight`, `.lora_B.bank`, an f-string
# `.lora_{ab}.`), the bank's index input, and the contract's own constants.
FORBIDDEN = {
    "a LoRA tensor name": re.compile(r"\.lora_(?:[AB]\b|\{)|\blora_[AB]\.(?:weight|bank)\b|\.lora_[\"']"),
    "the adapter index input": re.compile(r"(?<!\w)adapter_index(?!\w)"),
    "a contract constant": re.compile(r"^\s*(?:NO_ADAPTER|ADAPTER_INDEX|PEFT_PREFIX|EXTERNAL_DATA_THRESHOLD)\s*="),
}
OWNERS = {"a contract constant": {PACKAGE / "artifacts" / "onnxio.py"}}  # onnxio owns the external-data threshold


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def test_only_the_contract_module_spells_contract_names():
    offenders = []
    for path in modules().values():
        for what, pattern in FORBIDDEN.items():
            if path.is_relative_to(CONTRACT) or path in OWNERS.get(what, ()):
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{n}: {what}: {line.strip()}")
    assert not offenders, "use lora_export.contract instead:\n" + "\n".join(offenders)


def test_the_rule_catches_what_it_is_for():
    """The patterns above are not vacuous: each old spelling is caught, and look-alikes are not."""
    caught = [
        'f"{path}.lora_A.weight"',
        "name.endswith('.lora_B.bank')",
        'f"{p}.lora_{ab}.{kind}"',
        'if ".lora_" in name',
        'feeds["adapter_index"]',
        "NO_ADAPTER = -1",
    ]
    fine = ['"no_adapter_index"', "lora_A (PEFT's attribute)", 'tag = path + ".lora_fused"', "ADAPTER_INDEX"]
    hits = lambda text: [w for w, p in FORBIDDEN.items() if p.search(text)]  # noqa: E731
    assert all(hits(t) for t in caught), [t for t in caught if not hits(t)]
    assert not any(hits(t) for t in fine), [t for t in fine if hits(t)]


def import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports (anywhere in the file, lazy imports included)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for a in node.names:  # `from pkg import submodule` depends on the submodule
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if sub in mods else node.module)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w) :] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (cycle := visit(v)):
            return cycle
    return None


def test_no_import_circle_in_the_package():
    graph = import_graph()
    contract = {m for m in graph if m == "lora_export.contract" or m.startswith("lora_export.contract.")}
    assert "lora_export.contract.names" in contract
    for m in contract:  # the bottom floor: its own modules and the errors, nothing else of the package
        assert graph[m] <= contract | {"lora_export.errors"}, (m, graph[m] - contract)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail


def test_the_runtime_does_not_import_the_export_stack():
    graph = import_graph()
    seen, todo = set(), [m for m in graph if m.startswith("lora_export.runtime")]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph[m]
    assert not {m for m in seen if m.startswith(("lora_export.export", "lora_export.passes", "lora_export.cli"))}


def test_every_module_imports_in_a_fresh_interpreter():
    names = [n for n in modules() if not n.endswith("__main__")]
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    proc = subprocess.run(
        [sys.executable, "-c", code, *names],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PACKAGE.parent,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


# The rooms of the package, bottom floor first: a module imports only from its own room or a lower floor.
FLOORS = [
    {"lora_export", "errors", "quiet"},
    {"contract"},
    {"artifacts"},
    {"adapters"},
    {"models"},
    {"export"},
    {"passes"},
    {"engines"},
    {"backends"},
    {"runtime"},
    {"verify"},
    {"serving"},
    {"bench"},  # above serving: the serve benchmark drives a server
    {"inspection", "demo"},
    {"api"},
    {"cli"},
    {"__main__"},
]


def room_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def arrows_up(graph: dict[str, set[str]]) -> list[str]:
    floor = {room: n for n, rooms in enumerate(FLOORS) for room in rooms}

    def up(m: str, d: str) -> bool:  # a higher floor, or another room on the same floor
        here, there = floor[room_of(m)], floor[room_of(d)]
        return there > here or (there == here and room_of(d) != room_of(m))

    return [f"{m} -> {d}" for m, deps in sorted(graph.items()) for d in sorted(deps) if up(m, d)]


def test_every_room_has_a_floor_and_no_arrow_points_up():
    graph = import_graph()
    floor = {room for rooms in FLOORS for room in rooms}
    assert {room_of(m) for m in graph} <= floor, {room_of(m) for m in graph} - floor
    assert arrows_up(graph) == []
    # the check can fail: the export stack reaching into serving, a room beside another on its floor
    assert arrows_up({"lora_export.export.decoder": {"lora_export.serving.app"}}) == [
        "lora_export.export.decoder -> lora_export.serving.app"
    ]
    assert arrows_up({"lora_export.serving.app": {"lora_export.bench.suite"}}) != []
    assert arrows_up({"lora_export.inspection": {"lora_export.demo"}}) != []
