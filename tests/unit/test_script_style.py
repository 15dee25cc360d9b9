"""Every Lua script of the product is called one way and states its contract (see libs.service.scripts).

Walks the Python of services/ and libs/ with `ast`:
- no call of `.eval`, `.evalsha` or `.script_load`: scripts run through redis-py's
  Script (EVALSHA, reloaded transparently after NOSCRIPT);
- every string holding `redis.call` is a module-level constant, alone or a `+`
  chain of constants;
- a script (one that reads KEYS or ARGV) starts with its own header literal,
  `-- KEYS:` / `-- ARGV:` / `-- Returns:` lines in that order, and lists as `[n]`
  every KEYS[n] and ARGV[n] it reads; a fragment reads neither and defines a
  `local function`, to be put after a script's header.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("services", "libs")
FORBIDDEN = {"eval", "evalsha", "script_load", "eval_ro", "evalsha_ro"}
_INDEX = {"KEYS": re.compile(r"\bKEYS\[(\d+)\]"), "ARGV": re.compile(r"\bARGV\[(\d+)\]")}
_HEADER = ("-- KEYS:", "-- ARGV:", "-- Returns:")


def eval_calls(source: str) -> list[str]:
    """Return `line: .name(` for every call of a forbidden script method."""
    return [f"{node.lineno}: .{node.func.attr}(" for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FORBIDDEN]


def _chain(node: ast.expr) -> list[ast.expr] | None:
    """Return the operands of a `+` chain of string literals and names, left to right; None if it is not one."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _chain(node.left), _chain(node.right)
        return None if left is None or right is None else left + right
    if _literal(node) is not None or isinstance(node, ast.Name):
        return [node]
    return None


def _literal(node: ast.expr) -> str | None:
    """Return a string literal's text; for an f-string (constants spliced in), its literal parts."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(part.value for part in node.values if isinstance(part, ast.Constant))
    return None


def _code(text: str) -> str:
    return "\n".join(line.split("--", 1)[0] for line in text.splitlines())


def _header_problems(name: str, head: str, body: str) -> list[str]:
    comments = []
    for line in head.lstrip().splitlines():
        if not line.startswith("--"):
            break
        comments.append(line)
    starts = [next((i for i, line in enumerate(comments) if line.startswith(tag)), -1) for tag in _HEADER]
    if -1 in starts or starts != sorted(starts):
        return [f"{name}: does not open with its own header: {' / '.join(_HEADER)} lines, in that order"]
    sections = {"KEYS": "\n".join(comments[starts[0]:starts[1]]), "ARGV": "\n".join(comments[starts[1]:starts[2]])}
    problems = []
    for kind, pattern in _INDEX.items():
        listed = set(re.findall(r"\[(\d+)\]", sections[kind]))
        missing = sorted(set(pattern.findall(_code(body))) - listed, key=int)
        if missing:
            problems.append(f"{name}: header does not list {kind} " + ", ".join(f"[{n}]" for n in missing))
    return problems


def lua_problems(source: str) -> list[str]:
    """Return what breaks the script style in one module's source."""
    tree = ast.parse(source)
    problems: list[str] = []
    checked: set[int] = set()
    for stmt in tree.body:
        target = stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else (
            stmt.target if isinstance(stmt, ast.AnnAssign) else None)
        if not isinstance(target, ast.Name) or stmt.value is None:
            continue
        operands = _chain(stmt.value)
        if operands is None:
            continue
        text = "".join(_literal(op) or "" for op in operands)
        if "redis.call" not in text and not any(p.search(text) for p in _INDEX.values()):
            continue
        checked.update(id(node) for op in operands for node in ast.walk(op))
        name = f"{stmt.lineno}: {target.id}"
        if any(p.search(_code(text)) for p in _INDEX.values()):
            first = operands[0]
            head = _literal(first) or ""
            problems += _header_problems(name, head, text)
        elif "local function" not in text:
            problems.append(f"{name}: a fragment (no KEYS/ARGV) must define a `local function`")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and "redis.call" in node.value
                and id(node) not in checked):
            problems.append(f"{node.lineno}: Lua outside a module-level constant")
    return problems


def _product_modules() -> list[Path]:
    return sorted(p for top in PRODUCT for p in (ROOT / top).rglob("*.py") if ".venv" not in p.parts)


def test_no_module_calls_eval_evalsha_or_script_load() -> None:
    found = [f"{path.relative_to(ROOT)}:{hit}" for path in _product_modules()
             for hit in eval_calls(path.read_text())]
    assert found == [], "run scripts as `redis.register_script(SRC)` / `script_for(redis, SRC)`:\n" + "\n".join(found)


def test_every_lua_script_is_a_constant_that_opens_with_its_keys_argv_returns_header() -> None:
    found = [f"{path.relative_to(ROOT)}:{problem}" for path in _product_modules()
             for problem in lua_problems(path.read_text())]
    assert found == [], "see libs/service/scripts.py for the style:\n" + "\n".join(found)


def test_the_product_has_lua_scripts_to_check() -> None:
    # Guards the walk itself: were the paths or the detection wrong, the two tests above would pass on nothing.
    source = (ROOT / "services/scheduler/mover.py").read_text()
    assert "redis.call" in source and lua_problems(source) == []
    assert lua_problems(source.replace("-- KEYS:", "-- keys:")) != []
    assert len(_product_modules()) > 50


_GOOD = '''
FRAGMENT = """
local function bump(key) return redis.call('INCR', key) end
"""

SCRIPT = """
-- KEYS: [1] counter (string), [2] log (stream)
-- ARGV: [1] entry
-- Returns: the new count
""" + FRAGMENT + """
redis.call('XADD', KEYS[2], '*', 'e', ARGV[1])
return bump(KEYS[1])
"""
'''


@pytest.mark.parametrize(("source", "expected"), [
    (_GOOD, []),
    (_GOOD.replace('FRAGMENT = """', 'FRAGMENT = f"""').replace("'INCR'", "'{INCR}'"), []),
    (_GOOD.replace('SCRIPT = """', 'SCRIPT = f"""').replace("-- Returns:", "-- {RETURNS}"),
     ["6: SCRIPT: does not open with its own header"]),
    ("async def f(r):\n    await r.eval(S, 0)\n    await r.evalsha(h, 0)\n", None),
    (_GOOD.replace("-- ARGV: [1] entry\n", ""), ["6: SCRIPT: does not open with its own header"]),
    (_GOOD.replace("[2] log (stream)", "log"), ["6: SCRIPT: header does not list KEYS [2]"]),
    (_GOOD.replace("ARGV[1])", "ARGV[1], ARGV[2])"), ["6: SCRIPT: header does not list ARGV [2]"]),
    (_GOOD.replace('SCRIPT = """\n', 'SCRIPT = FRAGMENT + """\n'), ["6: SCRIPT: does not open with its own header"]),
    (_GOOD.replace("local function bump(key)", "local bump = function(key)"),
     ["2: FRAGMENT: a fragment (no KEYS/ARGV) must define a `local function`"]),
    ("class A:\n    S = \"return redis.call('GET', KEYS[1])\"\n", ["2: Lua outside a module-level constant"]),
    ("def f():\n    return \"return redis.call('GET', KEYS[1])\"\n", ["2: Lua outside a module-level constant"]),
])
def test_the_checks_catch_each_kind_of_departure(source: str, expected: list[str] | None) -> None:
    if expected is None:
        assert eval_calls(source) == ["2: .eval(", "3: .evalsha("]
        return
    found = lua_problems(source)
    assert len(found) == len(expected) and all(f.startswith(e) for f, e in zip(found, expected, strict=True)), found
