"""Mode `compile`: compile every program of a step for a target, and report what it costs.

    python -m balcap.main --config=configs/qwen7b.py:mode=compile,hardware=tpu \
        --config.compile.topology=v5e-64
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m balcap.main \
        --config=configs/qwen7b.py:mode=compile,hardware=gpu8 --config.compile.accelerator=h100

For each program (`programs.PROGRAMS`, or `config.compile.programs`) it prints and writes to
`<workdir>/compile.json`: per-device memory from the compiled program (arguments, outputs,
temporaries, generated code, total; against the chip's capacity: headroom or shortfall), FLOPs
and bytes accessed per device from XLA's cost analysis, the collectives in the optimised HLO
(static count and bytes by kind: a loop body's collective counts once), a roofline time for
the chip (max of FLOPs / peak and bytes / HBM bandwidth, and which bound), and the ideal
FLOPs and bytes (`ideal.py`) beside the compiled ones. A program that does not fit makes the
command exit nonzero naming it and by how much, after the report is written.

XLA's cost analysis counts a loop body once. So FLOPs and bytes are measured on programs
lowered again with every layer scan unrolled (`layers.unrolled_scans`: same params, no loop);
the update's micro-batch loop is measured at one and two micro-batches and extrapolated
linearly (`programs.Program.cost_parts`); the decode loop is reported through its parts
(`sample` holds the whole sampler's memory; its time is `sample_prefill` plus
`sample_decode_step` times the new tokens). On a TPU the cost-only copies are also compiled
without collective-matmul loops and without on-core prefetching (`_COST_ONLY_OPTIONS`), so
FLOPs count every matmul and bytes are HBM bytes. Memory is that of the program as it runs.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import jax

from balcap import configs, parallel, paths
from balcap.aot import hardware, programs
from balcap.models import layers

GIB = 2 ** 30
_COLLECTIVE = re.compile(
    r"=\s*(?P<type>.+?)\s+(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|"
    r"collective-permute)(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|[su](?:4|8|16|32|64)|bf16|f8\w*|f16|f32|f64|c64|c128)\[([\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16}


def _array_bytes(kind: str, dims: str) -> int:
  size = 1
  for d in filter(None, dims.split(",")):
    size *= int(d)
  if kind in _BYTES:
    return size * _BYTES[kind]
  if kind.startswith("f8"):
    return size
  return size * max(1, int(kind[1:]) // 8)


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
  """{op: {count, bytes}} of the collectives in optimised HLO text (result sizes)."""
  found: dict[str, dict[str, float]] = {}
  for line in hlo_text.splitlines():
    match = _COLLECTIVE.search(line)
    if not match:
      continue
    entry = found.setdefault(match["op"], {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += sum(_array_bytes(k, d) for k, d in _ARRAY.findall(match["type"]))
  return found


def analyze(program: programs.Program, target: hardware.Target,
            capacity: float | None) -> dict[str, Any]:
  """Compiles `program` and measures it (see the module docstring)."""
  started = time.perf_counter()
  compiled = program.lower().compile()
  seconds = time.perf_counter() - started
  stats = compiled.memory_analysis()
  memory = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
            "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
            "code": stats.generated_code_size_in_bytes}
  memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"]
                     + memory["temporaries"] + memory["code"])
  result = {"note": program.note, "compile_seconds": round(seconds, 1), "memory": memory,
            "flops": None, "bytes_accessed": None, "repeats": program.repeats,
            "ideal_flops": program.ideal_flops, "ideal_bytes": program.ideal_bytes,
            "flops_vs_ideal": None, "bytes_vs_ideal": None,
            "collectives": collectives(compiled.as_text())}
  if capacity:
    result["capacity"] = capacity
    result["headroom"] = capacity - memory["total"]
    result["fits"] = memory["total"] <= capacity
  if not program.costs():  # memory only (the whole sampler: see its parts)
    result["costs_error"] = "memory only: time = sample_prefill + steps x sample_decode_step"
    return result
  try:
    flops, accessed = _costs(program, target)
  except Exception as e:  # pylint: disable=broad-except
    # The program itself compiled: whether it fits stands. Only its costs are unknown (the
    # unrolled copy is a bigger program than the one that runs and may not fit the chip).
    result["costs_error"] = f"{type(e).__name__}: {e}"
    return result
  result.update(flops=flops, bytes_accessed=accessed,
                flops_vs_ideal=flops / program.ideal_flops if program.ideal_flops else None,
                bytes_vs_ideal=accessed / program.ideal_bytes if program.ideal_bytes else None)
  chip = target.accelerator
  if chip is not None:
    compute_s, memory_s = flops / chip.peak_flops, accessed / chip.hbm_bandwidth
    result["roofline"] = {
        "seconds": max(compute_s, memory_s), "bound": "compute" if compute_s >= memory_s
        else "memory", "compute_seconds": compute_s, "memory_seconds": memory_s,
        "ideal_seconds": max(program.ideal_flops / chip.peak_flops,
                             program.ideal_bytes / chip.hbm_bandwidth)}
  return result


# The cost-only compiles on a TPU change where data sits and how collectives overlap, never
# which FLOPs run or which bytes must cross HBM:
# - no windowed einsums: with a tensor axis XLA rewrites an all-gather (or reduce-scatter) and
#   its matmul into a loop over the shards ("collective matmul"), and the cost analysis counts
#   a loop body once. The qwen7b score program at fsdp 16 x tensor 4 (v5e-64) counted 97 TFLOP
#   with them (0.51x the formula, 379 loops) and 190 TFLOP (1.00x) without;
# - no memory-space assignment: MSA prefetches operands into the chip's on-core memory (`S(1)`
#   in the HLO), and each prefetch's read and write and the on-core reads all count as bytes
#   accessed. Without it every access is an HBM access, which is what the roofline's HBM
#   bandwidth needs (the same program: 902 -> 730 GB); an upper bound, as the program that
#   runs may keep an operand on core and read it from HBM once.
_COST_ONLY_OPTIONS = {"tpu": {"xla_msa_enable": False,
                              "xla_tpu_enable_windowed_einsum_for_all_gather": False,
                              "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}}
# When even that does not fit: without the latency-hiding scheduler nothing is prefetched
# layers ahead, so a program whose every layer and micro-batch is unrolled fits where the
# scheduled one may not. Scheduling moves no FLOPs and no bytes.
_COST_ONLY_FALLBACK = {"tpu": {"xla_tpu_enable_latency_hiding_scheduler": False}}


def _compile_for_costs(lowered, platform: str):
  options = _COST_ONLY_OPTIONS.get(platform)  # None: the backend's defaults
  try:
    return lowered.compile(options)
  except Exception as e:  # pylint: disable=broad-except
    fallback = _COST_ONLY_FALLBACK.get(platform)
    if fallback is None or "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return lowered.compile({**(options or {}), **fallback})


def _costs(program: programs.Program, target: hardware.Target) -> tuple[float, float]:
  """(FLOPs, bytes accessed) per device: sum(coefficient x cost) over the cost parts, each
  lowered with every layer scan unrolled (XLA's cost analysis counts a loop body once)."""
  platform = target.devices[0].platform
  flops = accessed = 0.0
  try:
    for coefficient, lower in program.costs():
      if coefficient == 0:
        continue
      jax.clear_caches()  # the scans' unrolling is read when tracing: trace again
      with layers.unrolled_scans():
        cost = _compile_for_costs(lower(), platform).cost_analysis()
      cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
      flops += coefficient * float(cost.get("flops", 0.0))
      accessed += coefficient * float(cost.get("bytes accessed", 0.0))
  finally:
    jax.clear_caches()
  return flops, accessed


# What an accelerator's compiler says when the program cannot fit (TPU: at compile time).
_OUT_OF_MEMORY = re.compile(
    r"memory required for (?P<what>[\w ]+?) \((?P<need>[\d.]+)(?P<unit>[KMGT])\) exceeds "
    r"available HBM \((?P<have>[\d.]+)(?P<have_unit>[KMGT])\)")
# libtpu's other wording (E1000: CompileTimeHbmOom), after its memory-space assignment.
_OUT_OF_HBM = re.compile(
    r"Used (?P<need>[\d.]+)(?P<unit>[KMGT]) of (?P<have>[\d.]+)(?P<have_unit>[KMGT]) "
    r"(?P<what>hbm)")
_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _failure(error: Exception) -> dict[str, Any]:
  """A program that did not compile; one the compiler found too big is one that does not fit,
  with the compiler's figures."""
  message = f"{type(error).__name__}: {error}"
  match = _OUT_OF_MEMORY.search(str(error)) or _OUT_OF_HBM.search(str(error))
  if not match:
    return {"error": message}
  return {"error": message, "fits": False, "over": match["what"],
          "required": float(match["need"]) * _UNITS[match["unit"]],
          "available": float(match["have"]) * _UNITS[match["have_unit"]]}


def _gib(value: float) -> str:
  return f"{value / GIB:8.2f}"


# A GPU target simulated on CPU devices is compiled by XLA:CPU, which converts bf16 matmul
# operands to f32 before each dot (a [8, 4096] x [4096, 4096] bf16 matmul: 168 MB counted
# for 34 MB of weights) and fuses less than XLA:GPU. The f32 copies also sit in temporaries,
# all at once: 8 chained bf16 [2048, 2048] matmuls hold 134 MB of temporaries, every weight
# as f32 (so the 7B decode step on 8 simulated H100s has 24.7 GiB of temporaries next to its
# 14.2 GiB of bf16 weights). FLOPs hold; memory and bytes are upper bounds for the GPU.
SIMULATED_NOTE = ("compiled by XLA:CPU for a simulated mesh: FLOPs hold for the GPU; memory "
                  "and bytes are upper bounds (XLA:CPU keeps f32 copies of bf16 matmul "
                  "operands, up to 2x the weights' bytes in temporaries, and moves ~5x a bf16 "
                  "weight's bytes)")


def table(report: dict[str, Any]) -> str:
  """The report as a fixed-width table (also in the README)."""
  lines = [f"target {report['target']}, mesh {report['mesh']}"
           + (f", {report['accelerator']['name']}" if report.get("accelerator") else "")
           + (f", capacity {report['capacity'] / GIB:.1f} GiB/device" if report.get("capacity")
              else ""),
           f"{'program':20s}{'mem GiB':>9s}{'headroom':>10s}{'TFLOP':>9s}{'x ideal':>8s}"
           f"{'GB':>10s}{'x ideal':>8s}{'roofline':>16s}{'bound':>8s}  collectives"]
  for name, r in report["programs"].items():
    if "error" in r and r.get("fits") is False:
      lines.append(f"{name:20s} DOES NOT FIT: {r['over']} need {r['required'] / GIB:.2f} GiB, "
                   f"{r['available'] / GIB:.2f} GiB available")
      continue
    if "error" in r:
      lines.append(f"{name:20s} failed to compile: {r['error'][:200]}")
      continue
    if r.get("flops") is None:
      lines.append(f"{name:20s}{_gib(r['memory']['total'])} "
                   f"{_gib(r['headroom']) if 'headroom' in r else '       -'}  "
                   + (r["costs_error"] if r.get("costs_error", "").startswith("memory only")
                      else f"costs not measured: {r.get('costs_error', '')[:160]}"))
      continue
    roof = r.get("roofline")
    seconds = f"{roof['seconds'] * 1e3:.1f}ms" if roof else "-"
    if roof and r["repeats"] > 1:
      seconds = f"{roof['seconds'] * 1e3:.2f}ms x{r['repeats']}"
    ops = ", ".join(f"{op} {int(v['count'])} ({v['bytes'] / 1e6:.0f} MB)"
                    for op, v in sorted(r["collectives"].items())) or "-"
    ratio = lambda x: f"{x:8.2f}" if x else f"{'-':>8s}"  # noqa: E731
    lines.append(
        f"{name:20s}{_gib(r['memory']['total'])} "
        f"{_gib(r['headroom']) if 'headroom' in r else '       -'} "
        f"{r['flops'] / 1e12:8.2f}{ratio(r['flops_vs_ideal'])} {r['bytes_accessed'] / 1e9:9.1f}"
        f"{ratio(r['bytes_vs_ideal'])} {seconds:>15s}{(roof or {}).get('bound', '-'):>8s}  {ops}")
  if "sampler_roofline_seconds" in report:
    lines.append(f"sampler (prefill + decode steps): roofline "
                 f"{report['sampler_roofline_seconds']:.2f} s, ideal "
                 f"{report['sampler_ideal_seconds']:.2f} s")
  if report.get("note"):
    lines.append(f"note: {report['note']}")
  return "\n".join(lines)


def run(config, workdir: str) -> dict[str, Any]:
  """Mode `compile` (see the module docstring); returns the report."""
  c = config.compile
  target = hardware.make_target(c.topology, c.accelerator)
  mesh = parallel.make_mesh(config.mesh, devices=list(target.devices))
  capacity = (c.capacity_gib * GIB if c.capacity_gib
              else target.accelerator.hbm_bytes if target.accelerator else None)
  builder = programs.Builder(config, mesh)
  names = tuple(c.programs)
  report = {"target": target.name, "mesh": dict(mesh.shape), "capacity": capacity,
            "accelerator": None, "programs": {}}
  if target.accelerator is not None:
    chip = target.accelerator
    report["accelerator"] = {"name": chip.name, "peak_flops": chip.peak_flops,
                             "hbm_bandwidth": chip.hbm_bandwidth, "hbm_bytes": chip.hbm_bytes,
                             "source": chip.source}
  report["model"] = {"text_params": builder.text_params, "vision_params": builder.vision_params}
  if target.accelerator is not None and target.devices[0].platform == "cpu":
    report["note"] = SIMULATED_NOTE
  for program in builder.programs(names):
    print(f"compile: {program.name} ...", flush=True)
    try:
      report["programs"][program.name] = analyze(program, target, capacity)
    except Exception as e:  # pylint: disable=broad-except  (reported; the others still run)
      report["programs"][program.name] = _failure(e)
  parts = [report["programs"].get(n, {}).get("roofline")
           for n in ("sample_prefill", "sample_decode_step")]
  if all(parts):
    steps = report["programs"]["sample_decode_step"]["repeats"]
    report["sampler_roofline_seconds"] = parts[0]["seconds"] + steps * parts[1]["seconds"]
    report["sampler_ideal_seconds"] = (parts[0]["ideal_seconds"]
                                       + steps * parts[1]["ideal_seconds"])
  if jax.process_index() == 0:
    paths.write_text(os.path.join(workdir, "compile.json"), json.dumps(report, indent=2))
    print(table(report), flush=True)
  problems = []
  for name, r in report["programs"].items():
    if r.get("fits") is False and "memory" in r:
      problems.append(f"{name} needs {r['memory']['total'] / GIB:.2f} GiB per device, "
                      f"{-r['headroom'] / GIB:.2f} GiB over the {capacity / GIB:.2f} GiB "
                      f"capacity (arguments {r['memory']['arguments'] / GIB:.2f}, temporaries "
                      f"{r['memory']['temporaries'] / GIB:.2f} GiB)")
    elif r.get("fits") is False:
      problems.append(f"{name} does not fit: the compiler needs {r['required'] / GIB:.2f} GiB "
                      f"for {r['over']} per device, {r['available'] / GIB:.2f} GiB available")
    elif "error" in r:
      problems.append(f"{name} did not compile: {r['error']}")
  if problems:
    raise configs.BalcapError("compile report: " + "; ".join(problems)
                              + f" (report in {os.path.join(workdir, 'compile.json')})")
  return report
