"""``bench train`` / ``bench eval`` run end to end on the CPU with tiny-qwen3 (as CI does briefly).

The H100 numbers live in docs/performance.md; here the point is that both benchmarks measure
what they claim: the same rows for both variants, real tokens only, one variant per process.
"""

from __future__ import annotations

import json

import pytest

from spellxfer.bench.eval import parse_eval_variant
from spellxfer.bench.train import flops_per_token, parse_variant
from spellxfer.cli import main
from spellxfer.core.errors import SpellxferError


def test_variant_specs_parse_and_bad_ones_are_one_line_errors(capsys):
    assert parse_variant("spellxfer:kernels=none,batch_size=64,attention_mask=true") == (
        "spellxfer", {"kernels": "none", "batch_size": 64, "attention_mask": True})
    assert parse_variant("reference") == ("reference", {})
    for bad in ("spellxfer:foo=1", "fastest", "reference:kernels=none", "spellxfer:batch_size"):
        with pytest.raises(SpellxferError, match="--variants"):
            parse_variant(bad)
    assert main(["bench", "train", "--variants", "spellxfer:foo=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "foo=1" in err[0]


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="the refusal is for machines without a GPU"
)
@pytest.mark.parametrize("command", ["train", "eval", "sweep"])
def test_gpu_sized_benches_refuse_on_a_cpu_in_one_line_before_building_data(command, tmp_path, capsys):
    """qwen3-4b-shape on a CPU used to build the full data, then die by the OOM killer minutes later."""
    data = tmp_path / "data"
    rc = main(
        [
            "bench",
            command,
            "--model",
            "qwen3-4b-shape",
            "--data_dir",
            str(data),
            "--out",
            str(tmp_path / "b.json"),
        ]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (
        f"error: bench {command}: --model qwen3-4b-shape needs a CUDA GPU and none is visible here; "
        "on a CPU use --model tiny-qwen3 (or smollm2-135m)"
    )
    assert not data.exists() and not (tmp_path / "b.json").exists()


def test_flop_count_matches_the_qwen3_4b_shape():
    from transformers import Qwen3Config

    from spellxfer.models.registry import QWEN3_4B_SHAPE

    cfg = Qwen3Config(**QWEN3_4B_SHAPE)
    # 36 layers × (q 2560·4096 + k,v 2·2560·1024 + o 4096·2560 + MLP 3·2560·9728) = 3.63e9 body weights
    body = 36 * (2560 * 4096 + 2 * 2560 * 1024 + 4096 * 2560 + 3 * 2560 * 9728)
    assert flops_per_token(cfg, 0.0) == 4 * body
    assert flops_per_token(cfg, 0.5) == 4 * body + 4 * 151_936 * 2560 * 0.5


@pytest.mark.slow
def test_bench_train_reference_and_spellxfer_side_by_side(full_data, tmp_path):
    out = tmp_path / "train.json"
    rc = main(
        [
            "bench",
            "train",
            "--model",
            "tiny-qwen3",
            "--data_dir",
            str(full_data),
            "--variants",
            "reference",
            "spellxfer",
            "--batch_size",
            "16",
            "--reference_batch_size",
            "16",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    ref, ours = report["results"]
    assert (ref["variant"], ours["variant"]) == ("reference", "spellxfer")
    assert ref["tokens_per_second"] > 0 and ours["tokens_per_second"] > 0
    # both timed exactly 2 steps of 16 rows; real tokens exclude padding
    assert ref["real_tokens"] < ref["padded_tokens"] and ours["real_tokens"] <= ours["padded_tokens"]
    # random batches pad heavily (long rows mixed with short); length grouping hardly at all
    assert ours["padding_fraction"] < 0.5 * ref["padding_fraction"]
    assert ours["ratio_to_first"] == pytest.approx(ours["tokens_per_second"] / ref["tokens_per_second"])
    assert 0.2 < report["supervised_fraction"] < 0.5 and report["device"].startswith("CPU")
    assert report["versions"]["torch"] and "git_commit" in report


def test_eval_variant_specs_parse_and_bad_ones_are_one_line_errors(capsys):
    assert parse_eval_variant("spellxfer:engine=graph,batch_size=2048") == ("spellxfer", {"engine": "graph",
                                                                                       "batch_size": 2048})
    assert parse_eval_variant("spellxfer:batch_size=auto,decoding=greedy,max_new_tokens=32") == (
        "spellxfer", {"batch_size": "auto", "decoding": "greedy", "max_new_tokens": 32})
    assert parse_eval_variant("validation:config=configs/r16.yaml") == (
        "validation",
        {"config": "configs/r16.yaml"},
    )
    for bad in ("spellxfer:engine=turbo", "spellxfer:batch_size=0", "reference:engine=graph", "fastest",
                "validation:decoding=greedy", "spellxfer:batch_size"):
        with pytest.raises(SpellxferError, match="--variants"):
            parse_eval_variant(bad)
    assert main(["bench", "eval", "--variants", "spellxfer:engine=turbo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "engine=turbo" in err[0]


@pytest.mark.slow
def test_bench_eval_compares_engines_in_one_run(full_data, tmp_path):
    out = tmp_path / "eval.json"
    rc = main(["bench", "eval", "--model", "tiny-qwen3", "--data_dir", str(full_data), "--n_questions", "24",
               "--batch_size", "12", "--reference_batch_size", "12", "--max_new_tokens", "4", "--variants",
               "reference", "spellxfer:engine=eager", "spellxfer:engine=graph",
               "spellxfer:batch_size=auto,decoding=greedy,max_new_tokens=6", "validation:val_limit=6",
               "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    ref, eager, graph, auto, val = report["results"]
    for r in (ref, eager, graph, auto):
        assert r["questions"] == 24 and r["questions_per_second"] > 0
        assert 0 < r["new_tokens"] <= 24 * r["sampling"]["max_new_tokens"]
    # on a CPU a graph variant runs the static cache op by op; the eager one keeps the old loop
    assert (ref["engine"], eager["engine"], graph["engine"], auto["engine"]) == (
        "reference",
        "eager",
        "static",
        "static",
    )
    # auto: min(32 on a CPU, 24 asked)
    assert auto["batch_size"] == 24 and auto["sampling"]["decoding"] == "greedy"
    assert set(graph["one_batch_phases_seconds"]) >= {"prompts", "prefill", "decode", "finish"}
    assert set(ref["one_batch_phases_seconds"]) >= {"prompts", "decode"}
    # validation at r16.yaml's settings (greedy, its reply cap), on 6 + 6 questions
    assert val["questions"] == 12 and val["config"] == "configs/r16.yaml" and val["engine"] == {"static": 2}
    assert val["sampling"]["decoding"] == "greedy" and val["sampling"]["max_new_tokens"] == 32
    # what it takes to compare this run with another
    assert report["card"]["name"].startswith("CPU") and report["versions"]["torch"] and "git_commit" in report
    assert report["command"].startswith("python -m spellxfer bench eval --model tiny-qwen3")
    assert "validation:val_limit=6" in report["command"]
