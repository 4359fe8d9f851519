"""Mode `compile`: every program of a step compiled for a simulated 8-device mesh, the report's
fields, and a nonzero exit naming the program that does not fit a (deliberately tiny) chip."""

import json

import jax
import pytest

from balcap import parallel
from balcap.aot import hardware, programs, report
from balcap.models import layers
from test_main import balcap_main
from testlib import REPO, load_config_file

_TINY = [f"--config={REPO}/configs/tiny.py:mode=compile", "--config.compile.image_size=(224,224)",
         "--config.rl.batch_size=8", "--config.sampling.max_new_tokens=16",
         "--config.sft.max_length=96"]


def test_every_program_compiles_and_is_reported(tmp_path):
  done = balcap_main(*_TINY, "--config.compile.accelerator=h100",
                     f"--workdir={tmp_path / 'run'}", tmp_path=tmp_path, devices=8)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads((tmp_path / "run" / "compile.json").read_text())
  assert result["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert result["accelerator"]["name"] == "H100 SXM 80GB" and result["capacity"] == 80e9
  assert set(result["programs"]) == {"sample", "sample_prefill", "sample_decode_step", "score",
                                     "update", "sft"}
  for name, program in result["programs"].items():
    memory = program["memory"]
    assert memory["total"] == (memory["arguments"] + memory["outputs"] - memory["aliased"]
                               + memory["temporaries"] + memory["code"]) > 0, name
    assert program["fits"] and program["headroom"] == 80e9 - memory["total"]
    if name == "sample":  # the whole loop: memory only, its time from its parts
      assert program["flops"] is None and "roofline" not in program
      continue
    assert program["flops"] > 0 and program["bytes_accessed"] > 0, name
    roof = program["roofline"]
    assert roof["seconds"] == max(roof["compute_seconds"], roof["memory_seconds"])
    assert roof["bound"] in ("compute", "memory")
  # Gradients are all-reduced over the 8 data shards; the decode step needs no collective.
  assert result["programs"]["update"]["collectives"]["all-reduce"]["count"] >= 1
  assert result["programs"]["sample_decode_step"]["repeats"] == 16
  assert result["sampler_roofline_seconds"] > 0
  for row in ("sample_decode_step", "update", "sft", "mem GiB", "roofline", "memory only"):
    assert row in done.stdout
  # An H100 simulated on CPU devices: its bytes are XLA:CPU's, and the report says so.
  assert result["note"] == report.SIMULATED_NOTE and "note: compiled by XLA:CPU" in done.stdout


def test_a_program_that_does_not_fit_exits_nonzero_naming_it(tmp_path):
  done = balcap_main(*_TINY, "--config.compile.programs=('sample_decode_step','update')",
                     "--config.compile.capacity_gib=0.001", f"--workdir={tmp_path / 'run'}",
                     tmp_path=tmp_path, devices=8)
  assert done.returncode != 0
  assert "update needs" in done.stderr and "GiB over the 0.00 GiB capacity" in done.stderr
  assert "Traceback" not in done.stderr
  result = json.loads((tmp_path / "run" / "compile.json").read_text())  # written first
  assert result["programs"]["update"]["fits"] is False


def test_collectives_are_read_from_hlo_text():
  hlo = "\n".join([
      "  %all-reduce.1 = f32[256,128]{1,0} all-reduce(%x), channel_id=1, replica_groups={}",
      "  %ag = (bf16[8,1024]{1,0}, bf16[8]{0}) all-gather-start(%y, %z), dimensions={0}",
      "  %rs = f32[4]{0} reduce-scatter(%w), dimensions={0}",
      "  %add = f32[256]{0} add(%a, %b)"])
  found = report.collectives(hlo)
  assert found == {"all-reduce": {"count": 1, "bytes": 256 * 128 * 4},
                   "all-gather": {"count": 1, "bytes": 8 * 1024 * 2 + 8 * 2},
                   "reduce-scatter": {"count": 1, "bytes": 16}}


def test_a_compiler_out_of_memory_is_a_program_that_does_not_fit():
  failure = report._failure(RuntimeError(  # pylint: disable=protected-access
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
      "temporaries (67.77G) exceeds available HBM (15.75G)."))
  assert failure["fits"] is False and failure["over"] == "HLO temporaries"
  assert failure["required"] == pytest.approx(67.77 * 2 ** 30)
  assert failure["available"] == pytest.approx(15.75 * 2 ** 30)


@pytest.mark.parametrize("name,expected", [("v5e-64", ("v5e", "v5e:8x8", 64)),
                                           ("v5p-32", ("v5p", "v5p:2x2x4", 16)),
                                           ("v4-32", ("v4", "v4:2x2x4", 16)),
                                           ("v6e-16", ("v6e", "v6e:4x4", 16)),
                                           ("v5e:4x8", ("v5e", "v5e:4x8", 32))])
def test_tpu_slice_names(name, expected):
  assert hardware.tpu_topology(name) == expected


def test_unknown_slices_are_refused():
  with pytest.raises(ValueError, match="use a slice name such as v5e-64"):
    hardware.tpu_topology("v3-8")
  with pytest.raises(ValueError, match="is not a size balcap knows"):
    hardware.tpu_topology("v5e-48")


def test_costs_count_every_scanned_layer(tmp_path):
  # XLA counts a loop body once: measured as it runs, a scanned decoder would show one
  # layer's FLOPs. The report unrolls the scans for its costs, so scanned and unrolled layers
  # cost the same.
  flops = {}
  for scan in (True, False):
    workdir = tmp_path / f"scan{scan}"
    done = balcap_main(*_TINY, "--config.compile.programs=('score',)",
                       f"--config.model.scan_layers={scan}", f"--workdir={workdir}",
                       tmp_path=tmp_path, devices=8)
    assert done.returncode == 0, done.stderr[-3000:]
    flops[scan] = json.loads((workdir / "compile.json").read_text())["programs"]["score"][
        "flops"]
  assert flops[True] == pytest.approx(flops[False], rel=0.02)


def test_update_costs_extrapolated_from_two_micro_batches_equal_the_whole_loop():
  # The update's costs come from 1 and 2 micro-batches, extrapolated to 4; compiling all 4
  # unrolled must give the same FLOPs (each micro-batch encodes every image again, so they
  # are not the 1-micro-batch program's).
  config = load_config_file("tiny", "mode=compile")
  config.compile.image_size = (224, 224)
  config.rl.batch_size, config.sampling.max_new_tokens = 8, 16
  config.rl.micro_batch_size = 16  # 64 rollouts: 4 micro-batches
  (update,) = programs.Builder(config, parallel.make_mesh(config.mesh)).programs(("update",))

  def flops(lower):
    jax.clear_caches()
    with layers.unrolled_scans():
      return lower().compile().cost_analysis()["flops"]
  extrapolated = sum(c * flops(lower) for c, lower in update.costs() if c)
  one_micro_batch = flops(update.costs()[0][1])
  assert extrapolated == pytest.approx(flops(update.lower), rel=0.01)
  assert extrapolated > 1.5 * one_micro_batch


def test_a_program_that_fits_but_whose_unrolled_copy_does_not_still_fits():
  # On a v5e-64 the 3B update runs in 4 GiB, but its unrolled two-micro-batch copy (compiled
  # for costs only) ran out of HBM: that must not make the program "not fit".
  def too_big():
    raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used "
                       "15.76G of 15.75G hbm.")
  x = jax.ShapeDtypeStruct((4, 4), jax.numpy.float32)
  program = programs.Program("update", lambda: jax.jit(lambda a: a @ a).lower(x), 128.0, 64.0,
                             cost_parts=[(1.0, too_big)])
  target = hardware.make_target("", "h100")
  result = report.analyze(program, target, 80e9)
  assert result["fits"] is True and result["memory"]["total"] > 0
  assert result["flops"] is None and "Used 15.76G" in result["costs_error"]
  assert "roofline" not in result
  table = report.table({"target": "t", "mesh": {}, "programs": {"update": result}})
  assert "costs not measured" in table


def test_libtpus_out_of_hbm_wording_reads_as_does_not_fit():
  failed = report._failure(RuntimeError(  # pylint: disable=protected-access
      "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory in memory space hbm. "
      "Used 15.76G of 15.75G hbm. Exceeded hbm capacity by 16.29M."))
  assert failed["fits"] is False and failed["required"] == pytest.approx(15.76 * 2 ** 30)
  assert failed["available"] == pytest.approx(15.75 * 2 ** 30)


def test_tpu_cost_copies_count_every_matmul_and_only_hbm_bytes():
  """On a TPU the cost-only copies are compiled without collective-matmul loops (counted once
  by the cost analysis) and without on-core prefetching (counted as extra bytes); one that
  still runs out of memory is compiled again without the latency-hiding scheduler. Elsewhere
  they compile as they are."""
  calls = []

  class Lowered:
    def __init__(self, fail_first):
      self.fail_first = fail_first

    def compile(self, options=None):
      calls.append(options)
      if self.fail_first and len(calls) == 1:
        raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm.")
      return "compiled"

  compile_for_costs = report._compile_for_costs  # pylint: disable=protected-access
  assert compile_for_costs(Lowered(fail_first=True), "tpu") == "compiled"
  assert calls[0] == {"xla_msa_enable": False,
                      "xla_tpu_enable_windowed_einsum_for_all_gather": False,
                      "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}
  assert calls[1] == {**calls[0], "xla_tpu_enable_latency_hiding_scheduler": False}
  calls.clear()
  assert compile_for_costs(Lowered(fail_first=False), "cpu") == "compiled"
  assert calls == [None]
  calls.clear()
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
    compile_for_costs(Lowered(fail_first=True), "cpu")
