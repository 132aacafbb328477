#!/usr/bin/env python3
"""The layout check CI runs: the shape docs/architecture.md promises.

1. Layers: every top-level module of src/ has a rank (LAYERS, bottom first)
   and may import (`crate::x`) only modules of a lower rank.
2. No import cycle between the files of one folder (`crate::a::b`,
   `super::b`).
3. No function over MAX_FN lines, no file over MAX_FILE lines; code after a
   file's first `#[cfg(test)]`, and tests.rs files, are not counted.

Text-based (braces counted outside strings and comments), like the rest of
the tooling here: fast, no build needed. Exit status 1 lists every breach.
"""
import os
import re
import sys
from collections import defaultdict

MAX_FN = 80
MAX_FILE = 800

# Bottom first. A module may import those on earlier lines, never later ones.
LAYERS = [
    ["clock"],
    ["wire"],
    ["limits"],
    ["store"],
    ["content"],
    ["keys"],
    ["respond"],
    ["observe"],
    ["capacity"],
    ["jobs"],
    ["ledger"],
    ["config"],
    ["pipeline"],
    ["decision", "admin"],
    ["server"],
    ["cli"],
]
RANK = {m: i for i, row in enumerate(LAYERS) for m in row}


def strip(src, comments=True):
    """Blanks strings and char literals (and comments, unless told not
    to), keeping line breaks."""
    out, i, n = [], 0, len(src)
    while i < n:
        c = src[i]
        if not comments and src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(src[i:j])
            i = j
        elif src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', src[i : i + 10]) and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', src[i:]).group(1)
            end = src.find('"' + hashes, i + 2 + len(hashes))
            j = n if end < 0 else end + 1 + len(hashes)
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            j += 1
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == "'" and (m := re.match(r"'(\\u\{[0-9a-fA-F]+\}|\\.|[^\\'])'", src[i : i + 12])):
            out.append(" " * len(m.group(0)))
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def functions(code):
    """(name, first line, length) of every function body in stripped code."""
    for m in re.finditer(r"\bfn\s+([A-Za-z_][A-Za-z0-9_]*)", code):
        j, paren = m.end(), 0
        while j < len(code) and not (code[j] in "{;" and paren == 0):
            if code[j] in "(<[":
                paren += 1
            elif code[j] in ")>]":
                paren = max(0, paren - 1)
            j += 1
        if j >= len(code) or code[j] == ";":
            continue
        depth, k = 0, j
        while k < len(code):
            if code[k] == "{":
                depth += 1
            elif code[k] == "}":
                depth -= 1
                if depth == 0:
                    break
            k += 1
        first = code.count("\n", 0, m.start()) + 1
        yield m.group(1), first, code.count("\n", 0, k) + 2 - first


def cycles(edges):
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return found


def crate_paths(code):
    """Every `crate::a::b...` path, as a list of segments (groups expanded)."""
    for m in re.finditer(r"\bcrate((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{", code):
        head = [s for s in m.group(1).split("::") if s]
        depth, j = 1, m.end()
        while j < len(code) and depth:
            depth += {"{": 1, "}": -1}.get(code[j], 0)
            j += 1
        for item in re.split(r"[,{}]", code[m.end() : j - 1]):
            segs = [s.strip() for s in item.split("::") if s.strip()]
            if segs and segs[0] not in ("self", "*"):
                yield head + segs
        if head:
            yield head
    for m in re.finditer(r"\bcrate((?:::[A-Za-z_][A-Za-z0-9_]*)+)", code):
        yield [s for s in m.group(1).split("::") if s]


def main(src="src"):
    problems = []
    top_edges = defaultdict(set)
    folder_edges = defaultdict(lambda: defaultdict(set))
    fns = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d != "tests")
        for f in sorted(files):
            if not f.endswith(".rs") or f == "tests.rs":
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, src).split(os.sep)
            text = open(path, encoding="utf-8").read()
            cut = text.find("#[cfg(test)]")
            text = text if cut < 0 else text[:cut]
            code = strip(text)
            # Imports from code and paths named in comments and doc links
            # alike: a doc that points upward is a dependency too.
            named = strip(text, comments=False)
            lines = text.count("\n")
            if lines > MAX_FILE:
                problems.append(f"{path}: {lines} lines (at most {MAX_FILE}, tests aside)")
            for name, line, length in functions(code):
                fns.append((length, f"{path}:{line}", name))
            if rel[0] in ("lib.rs", "main.rs"):
                continue
            top = rel[0][:-3] if len(rel) == 1 else rel[0]
            if top not in RANK:
                problems.append(f"{path}: top-level module `{top}` has no layer in tools/layout.py")
                continue
            # the file's own name inside its folder (a/b.rs -> b, a/b/mod.rs -> b)
            inner = None
            if len(rel) >= 2:
                inner = rel[1][:-3] if rel[1].endswith(".rs") else rel[1]
                inner = None if inner == "mod" else inner
            for segs in crate_paths(named):
                if segs[0] != top:
                    if segs[0] in RANK and RANK[segs[0]] >= RANK[top] and segs[0] != top:
                        problems.append(f"{path}: imports crate::{segs[0]}, which is not below `{top}`")
                    top_edges[top].add(segs[0])
                elif inner and len(segs) > 1 and segs[1] != inner:
                    folder_edges[top][inner].add(segs[1])
            if inner and len(rel) == 2:
                for m in re.finditer(r"\bsuper::([a-z_][a-z0-9_]*)", code):
                    if m.group(1) != inner:
                        folder_edges[top][inner].add(m.group(1))
    for comp in cycles(top_edges):
        problems.append("module cycle: " + " <-> ".join(comp))
    for top, edges in sorted(folder_edges.items()):
        for comp in cycles(edges):
            problems.append(f"module cycle in {top}/: " + " <-> ".join(comp))
    fns.sort(reverse=True)
    for length, where, name in fns:
        if length > MAX_FN:
            problems.append(f"{where}: fn {name} is {length} lines (at most {MAX_FN})")
    for p in problems:
        print(p)
    longest = fns[0] if fns else (0, "-", "-")
    print(f"layout: {len(problems)} problem(s); longest function {longest[0]} lines ({longest[2]}, {longest[1]})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
