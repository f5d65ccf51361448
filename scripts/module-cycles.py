#!/usr/bin/env python3
"""Checks that the crate's top-level modules import each other without a cycle.

    scripts/module-cycles.py            # exit 0, or 1 with every cycle and the lines that make it
    scripts/module-cycles.py --graph    # also print the whole graph, one module a line

A module is a file `src/X.rs` or a directory `src/X/`. An edge X -> Y is a `crate::Y`
path in X's code outside comments and outside test code (files named `tests.rs` or
`*_tests.rs`, and `#[cfg(test)]` items): test code may reach anywhere. `lib.rs` and
`main.rs` are the root and are left out. Cycles are the strongly connected components
of more than one module (Tarjan), so one cycle through several modules is reported once.
"""

import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def without_comments(text):
    """The code with // and /* */ comments blanked (string literals kept intact)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i)
            i = n if j < 0 else j + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def without_test_items(code):
    """The code with every `#[cfg(test)]` item removed (a `mod x;`, or an item up to
    the end of its braces)."""
    out, pos = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]", code):
        if m.start() < pos:
            continue
        out.append(code[pos : m.start()])
        semi, brace = code.find(";", m.end()), code.find("{", m.end())
        if brace < 0 or (0 <= semi < brace):
            pos = semi + 1
            continue
        depth, j = 0, brace
        while j < len(code):
            if code[j] == "{":
                depth += 1
            elif code[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        pos = j + 1
    out.append(code[pos:])
    return "".join(out)


def graph():
    edges = {}
    for dirpath, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".rs") or name == "tests.rs" or name.endswith("_tests.rs"):
                continue
            path = os.path.join(dirpath, name)
            parts = os.path.relpath(path, ROOT).split(os.sep)
            top = parts[0][: -len(".rs")] if len(parts) == 1 else parts[0]
            if top in ("lib", "main"):
                continue
            with open(path, encoding="utf-8") as f:
                code = without_test_items(without_comments(f.read()))
            out = edges.setdefault(top, {})
            for m in re.finditer(r"\bcrate::([a-z_][a-z0-9_]*)", code):
                if m.group(1) != top:
                    line = code.count("\n", 0, m.start()) + 1
                    out.setdefault(m.group(1), []).append(f"{os.path.relpath(path, ROOT)}:{line}")
    return edges


def cycles(edges):
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in edges:
                continue
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
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def main():
    edges = graph()
    if "--graph" in sys.argv[1:]:
        for module in sorted(edges):
            print(f"{module} -> {', '.join(sorted(edges[module])) or '(nothing)'}")
    found = cycles(edges)
    for component in found:
        print(f"import cycle between modules: {' '.join(component)}")
        for a in component:
            for b in component:
                if b in edges[a]:
                    where = edges[a][b]
                    more = f" (+{len(where) - 3} more)" if len(where) > 3 else ""
                    print(f"  {a} -> {b}: {', '.join(where[:3])}{more}")
    if found:
        return 1
    print(f"no import cycle between the crate's {len(edges)} top-level modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
