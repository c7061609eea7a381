#!/usr/bin/env python3
"""The import graph of a crate's modules, from `crate::` paths in its source.

Usage: scripts/imports.py [SRC_DIR]   (default: src)
Prints one line per module: `module -> imported modules`, then every cycle
(two or more modules that import each other, directly or around a loop),
and exits 1 if there is one. A module is a file (`a/b.rs` or `a/b/mod.rs`
is `a::b`); `crate::a::b::Item` counts as an import of the deepest module
that exists.
"""
import os, re, sys

root = sys.argv[1] if len(sys.argv) > 1 else "src"
mods = {}
for d, _, files in os.walk(root):
    for f in files:
        if not f.endswith(".rs"):
            continue
        path = os.path.join(d, f)
        rel = os.path.relpath(path, root)[:-3].split(os.sep)
        if rel[-1] == "mod":
            rel = rel[:-1]
        if rel in (["lib"], ["main"]):
            continue
        mods["::".join(rel)] = path

def resolve(parts):
    for n in range(len(parts), 0, -1):
        m = "::".join(parts[:n])
        if m in mods:
            return m
    return None

def expand(text):
    """`crate::a::{b, c::d}` -> crate::a::b, crate::a::c::d (one level)."""
    out = []
    for m in re.finditer(r"crate::((?:\w+::)*)\{([^}]*)\}", text):
        for item in m.group(2).split(","):
            item = item.strip()
            if item and item != "self":
                out.append(m.group(1) + item)
            elif item == "self":
                out.append(m.group(1).rstrip(":"))
    for m in re.finditer(r"crate::(\w+(?:::\w+)*)::\*", text):
        out.append(m.group(1))
    for m in re.finditer(r"crate::(\w+(?:::\w+)*)(?![\w:])", text):
        out.append(m.group(1))
    return out

graph = {}
for m, path in mods.items():
    text = open(path).read()
    # Tests of a module may reach anywhere.
    text = re.split(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod \w+\s*\{", text)[0]
    # Comments (doc links included) are not imports.
    text = re.sub(r"//[^\n]*", "", text)
    # `super::x` and `self::x` are paths from the crate's root too.
    if "::" in m:
        text = re.sub(r"\bsuper::", "crate::" + m.rsplit("::", 1)[0] + "::", text)
    text = re.sub(r"\bself::(?=\w)", "crate::" + m + "::", text)
    text = re.sub(r"use super::\{", "use crate::" + m.rsplit("::", 1)[0] + "::{", text) if "::" in m else text
    deps = set()
    for p in expand(text):
        t = resolve([x for x in p.split("::") if x])
        if t and t != m:
            deps.add(t)
    # A folder's mod.rs naming its own submodules (`child::Item`), and a
    # submodule naming its parent (`super::Item`): imports too (a
    # declaration `mod child;` is not).
    for c in mods:
        if c.startswith(m + "::") and "::" not in c[len(m) + 2:]:
            child = c[len(m) + 2:]
            if re.search(r"(?<![:\w])" + child + r"::", text):
                deps.add(c)
    graph[m] = deps

for m in sorted(graph):
    print(f"{m} -> {', '.join(sorted(graph[m])) or '(none)'}")

# Strongly connected components (Tarjan).
index, low, stack, on, sccs, i = {}, {}, [], set(), [], [0]
def strong(v):
    index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
    for w in graph.get(v, ()):
        if w not in index:
            strong(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        c = []
        while True:
            w = stack.pop(); on.discard(w); c.append(w)
            if w == v: break
        if len(c) > 1: sccs.append(sorted(c))
sys.setrecursionlimit(10000)
for v in graph:
    if v not in index:
        strong(v)
for c in sccs:
    print("cycle:", " <-> ".join(c))
sys.exit(1 if sccs else 0)
