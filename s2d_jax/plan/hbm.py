"""The bytes a compiled program moves to and from HBM, read from its optimised HLO.

XLA's cost analysis sums the operands and outputs of every op whatever memory they live in. On a TPU a decode
step prefetches each layer's weights and cache blocks into VMEM (an async `slice-start` / `copy-start` into memory
space 1) and the products then read them there, so each weight byte is counted about three times (read from HBM,
written to VMEM, read by the product), and a roofline from those bytes is not one of HBM. Here only traffic with
an end in HBM (memory space 0: a layout with no `S(n)`) counts: an async copy once, at its start, for each end in
HBM; a fusion's operands and outputs in HBM, as much of each as it touches (a parameter read only through slices
or gathers counts the slices; an output updated in place by a `dynamic-update-slice` counts the update). A Pallas
kernel counts the bytes its cost estimate gives (at most its operands and outputs in HBM), other custom calls their
operands and outputs whole. A loop counts as often as it runs where that is fixed (a
scan over layers), once where it is not (a decode call's loop over steps: one step), and what the program does
outside its loops is shared by the steps one call runs. Logical bytes: tile padding is not counted. On a platform without memory spaces
(CPU) every byte is HBM's.
"""

from __future__ import annotations

import math
import re

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
               "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_LEAF = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = ")
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "partition-id", "replica-id",
        "after-all", "opt-barrier", "iota"}  # no bytes moved (an iota's output, if any, is tiny)
SLICING = {"slice", "dynamic-slice", "gather"}


def leaves(shape: str) -> list[tuple[float, int | None]]:
    """(bytes, memory space) of every array in a shape, tuples flattened; a scalar's space is None (it lives in
    registers or scalar memory, and is not counted)."""
    out = []
    for dtype, dims, layout in _LEAF.findall(shape):
        space = re.search(r"S\((\d+)\)", layout or "")
        out.append((DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d),
                    None if not dims else int(space.group(1)) if space else 0))
    return out


def in_hbm(shape: str) -> float:
    return sum(b for b, space in leaves(shape) if space == 0)


def size(shape: str) -> float:
    return sum(b for b, _ in leaves(shape))


def _balanced(text: str, start: int) -> int:
    """The index just past the bracket group opening at `start`."""
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] in "({[" and 1 or 0
        depth -= text[i] in ")}]" and 1 or 0
        if depth == 0:
            return i + 1
    return len(text)


def parse(hlo: str) -> tuple[dict, str]:
    """{computation: [(name, shape, opcode, operands, its arguments and attributes as written)]} and the entry
    computation's name."""
    comps, entry, current = {}, "", None
    for line in hlo.splitlines():
        head = re.match(r"(ENTRY )?%([\w.\-]+) \(", line)
        if head and line.rstrip().endswith("{"):
            current = comps.setdefault(head.group(2), [])
            entry = head.group(2) if head.group(1) else entry
            continue
        m = _INSTR.match(line)
        if current is None or not m:
            continue
        rest = line[m.end():]
        end = _balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
        shape, rest = rest[:end], rest[end:].lstrip()
        opcode = rest[:rest.index("(")]
        close = _balanced(rest, len(opcode))
        operands = re.findall(r"%([\w.\-]+)", rest[len(opcode):close])
        current.append((m.group(1), shape, opcode, operands, rest[len(opcode):]))
    return comps, entry


def _called(attrs: str, key: str) -> list[str]:
    m = re.search(key + r"=(\{[^}]*\}|%[\w.\-]+)", attrs)
    return re.findall(r"%([\w.\-]+)", m.group(1)) if m else []


def _fusion(comps: dict, fused: str, operands: list[str], shapes: dict, out_shape: str) -> float:
    """HBM bytes of one fusion: each operand in HBM as much as the fused computation touches it, each output in
    HBM, an in-place update counted as its update."""
    body = comps[fused]
    defs = {name: (shape, op, o) for name, shape, op, o, _ in body}
    root = body[-1]
    roots = [defs[x] for x in root[3]] if root[2] == "tuple" else [root[1:4]]
    total = 0.0
    for i, operand in enumerate(operands):
        if operand in shapes and in_hbm(shapes[operand]):
            total += min(in_hbm(shapes[operand]), _touched(comps, fused, i))
    outs = leaves(out_shape)
    for k, (nbytes, space) in enumerate(outs):
        if space == 0:
            op = roots[k] if len(roots) == len(outs) else None
            total += size(defs[op[2][1]][0]) if op and op[1] == "dynamic-update-slice" else nbytes
    return total


def _touched(comps: dict, comp: str, index: int) -> float:
    """The bytes a fused computation reads of its parameter `index`: the slices it takes where it only slices it
    (through bitcasts and nested fusions), nothing where it only updates it in place, else all of it."""
    body = comps[comp]
    name = next(n for n, _, op, _, args in body if op == "parameter" and args.startswith(f"({index})"))
    users: dict[str, list] = {}
    for n, shape, op, o, attrs in body:
        for pos, x in enumerate(o):
            users.setdefault(x, []).append((n, shape, op, pos, attrs))

    root = body[-1]
    out = {root[0]} | set(root[3] if root[2] == "tuple" else ())  # what flows out to the caller, whole

    def reads(value: str, whole: float) -> float:
        if value in out:
            return whole
        total = 0.0
        for n, shape, op, pos, attrs in users.get(value, []):
            if op in SLICING and pos == 0:
                total += size(shape)
            elif op == "dynamic-update-slice" and pos == 0 and n == body[-1][0]:
                continue  # updated in place (the fusion's result): the old values are not read
            elif op in ("bitcast", "reshape"):
                total += reads(n, whole)
            elif op == "fusion":
                total += _touched(comps, _called(attrs, "calls")[0], pos)
            else:
                return whole
        return min(total, whole)

    return reads(name, size(next(shape for n, shape, *_ in body if n == name)))


def _trips(comps: dict, attrs: str) -> int:
    """A loop's trip count where it is fixed (XLA's annotation, or its condition comparing the counter with a
    constant, as a scan's does); 1 where it is not (a decode call's loop runs up to a `steps` argument)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
    if known:
        return int(known.group(1))
    cond = comps.get((_called(attrs, "condition") or [""])[0], [])
    consts = {name: args for name, _, op, _, args in cond if op == "constant"}
    root = cond[-1] if cond else None
    if root and root[2] == "compare" and "direction=LT" in root[4] and len(root[3]) == 2 and root[3][1] in consts:
        value = re.match(r"\((-?\d+)\)", consts[root[3][1]])
        return max(int(value.group(1)), 1) if value else 1
    return 1


def hbm_bytes(hlo: str, steps: int = 1) -> float:
    """Bytes one step of the program reads from and writes to HBM, per device (see the module's docstring);
    `steps`: the iterations its top-level loop runs per call (a decode call's steps), which share what lies
    outside it."""
    return sum(b for b, *_ in breakdown(hlo, steps))


def breakdown(hlo: str, steps: int = 1) -> list[tuple[float, str, str, str]]:
    """Where `hbm_bytes` comes from: (bytes, opcode, instruction, the JAX op it came from) per instruction that
    moves any, in program order."""
    comps, entry = parse(hlo)

    def one(shapes: dict, shape: str, opcode: str, operands: list[str], attrs: str) -> float:
        if opcode in ("copy-start", "slice-start"):  # an async DMA: (source, destination, context...)
            ends = [(b, s) for b, s in leaves(shape) if s is not None]
            return min(b for b, _ in ends) * sum(s == 0 for _, s in ends) if ends else 0
        if opcode.endswith("-start"):  # a collective: its operands read, its results written
            return in_hbm(shape)
        if opcode == "fusion":
            return _fusion(comps, _called(attrs, "calls")[0], operands, shapes, shape)
        if opcode == "dynamic-update-slice":  # in place: the update read, and written over the buffer's rows
            update = shapes[operands[1]]
            return in_hbm(update) + (size(update) if in_hbm(shapes[operands[0]]) else 0)
        if opcode in SLICING:  # the slice read, the result written
            return (size(shape) if in_hbm(shapes[operands[0]]) else 0) + in_hbm(shape)
        whole = sum(in_hbm(shapes[o]) for o in operands if o in shapes) + in_hbm(shape)
        kernel = re.search(r'"cost_estimate":\{[^}]*"bytes_accessed":"(\d+)"', attrs)  # a Pallas kernel's own
        return min(whole, float(kernel.group(1))) if kernel else whole

    def walk(comp: str, times: float, top: bool) -> list:
        shapes = {name: shape for name, shape, *_ in comps.get(comp, [])}
        rows = []
        for name, shape, opcode, operands, attrs in comps.get(comp, []):
            if opcode in FREE or opcode.endswith("-done"):
                continue
            if opcode == "while":
                n = _trips(comps, attrs)
                for c in _called(attrs, "body") + _called(attrs, "condition"):
                    rows += walk(c, times * n, False)
            elif opcode == "conditional":  # the costliest branch
                branches = [walk(c, times, top) for c in _called(attrs, "branch_computations")
                            + _called(attrs, "true_computation") + _called(attrs, "false_computation")]
                rows += max(branches, key=lambda found: sum(r[0] for r in found), default=[])
            elif opcode in ("call", "async-start"):
                for c in _called(attrs, "to_apply") + _called(attrs, "calls"):
                    rows += walk(c, times, top)
            elif b := times / (steps if top else 1) * one(shapes, shape, opcode, operands, attrs):
                op = re.search(r'op_name="([^"]*)"', attrs)
                rows.append((b, opcode, name, op.group(1) if op else ""))
        return rows

    return walk(entry, 1.0, True)
