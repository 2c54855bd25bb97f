"""What the quantizer consumes: the whole set, windows not truncation, random subsets, counts, preflight."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from pascal_moe.errors import PascalError
from pascal_moe.models import moe_layers
from pascal_moe.models.hooks import router_hooks
from pascal_moe.quant import run as qrun
from pascal_moe.quant.calib import CalibRows, calib_windows, cut_windows, pick_rows, window_length
from pascal_moe.quant.config import QuantizeConfig

WINDOW = 32


@pytest.fixture
def calib_dir(tmp_path: Path, seed_parquet: Path) -> Path:
    """A balance-like calib dir: 14 rows of input_ids (packed windows of <= 32 tokens, varied lengths)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(__file__).resolve().parents[1] / "data" / "models" / "qwen3-moe-tiny"))
    texts = pd.read_parquet(seed_parquet).query("split == 'train'")["text"].head(14).tolist()
    ids = [tok(t, add_special_tokens=False)["input_ids"][: WINDOW - (i % 5) * 4] for i, t in enumerate(texts)]
    out = tmp_path / "calib"
    out.mkdir()
    pd.DataFrame({"input_ids": ids, "n_tokens": [len(x) for x in ids], "text": texts, "source": "seed"}).to_parquet(
        out / "calib.parquet"
    )
    return out


def quantize(model: Path, calib: Path, out: Path, **kw) -> dict:
    base = dict(
        model=str(model),
        calib=str(calib),
        out=str(out),
        scheme="int4-g32",
        method="rtn",
        iters=0,
        batch_size=4,
        device="cpu",
    )
    qrun.run(QuantizeConfig(**{**base, **kw}))
    return json.loads((out / "quantize.json").read_text())


def full_forward_counts(model_dir: Path, windows: list[list[int]]) -> dict[str, list[int]]:
    """Tokens per expert from the routers of ONE full fp forward per window (independent of the block chain)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    moes = moe_layers(model)
    counts = {f"layer{m.layer_index}": torch.zeros(m.spec.n_experts, dtype=torch.long) for m in moes}
    logs: list[tuple[int, torch.Tensor]] = []
    with router_hooks([m.router for m in moes], lambda i, z, _a: logs.append((i, z.detach()))), torch.no_grad():
        for w in windows:
            model(input_ids=torch.tensor([w]), use_cache=False)
    for i, z in logs:
        _, idx = moes[i].select(z)
        counts[f"layer{moes[i].layer_index}"] += torch.bincount(idx.reshape(-1), minlength=moes[i].spec.n_experts)
    return {k: v.tolist() for k, v in counts.items()}


def test_whole_set_by_default_and_row_order_does_not_matter(calib_dir: Path, tiny_moe_dir, tmp_path: Path) -> None:
    model = tiny_moe_dir("qwen3_moe")
    df = pd.read_parquet(calib_dir / "calib.parquet")
    a = quantize(model, calib_dir, tmp_path / "a")
    assert a["calib_rows_used"] == len(df) and a["calib_tokens_used"] == int(df["n_tokens"].sum())
    assert a["calib"]["seq_len"] == WINDOW  # the set's own window: its longest input_ids row
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    df.sample(frac=1.0, random_state=3).reset_index(drop=True).to_parquet(shuffled / "calib.parquet")
    b = quantize(model, shuffled, tmp_path / "b")
    assert b["expert_token_counts"] == a["expert_token_counts"] and set(a["expert_token_counts"]) == {
        "layer0",
        "layer2",
    }
    assert (b["calib_tokens_used"], b["calib_rows_used"]) == (a["calib_tokens_used"], a["calib_rows_used"])
    assert b["calib"]["ids_fingerprint"] == a["calib"]["ids_fingerprint"]


def test_counts_equal_full_forward_and_coverage_match(calib_dir: Path, tiny_moe_dir, tmp_path: Path) -> None:
    """The quantizer's block-chain counts equal an independent full-forward count; coverage.parquet is compared."""
    model = tiny_moe_dir("qwen3_moe")
    windows = pd.read_parquet(calib_dir / "calib.parquet")["input_ids"].map(list).tolist()
    want = full_forward_counts(model, windows)
    assert quantize(model, calib_dir, tmp_path / "a")["expert_token_counts"] == want
    rows = [
        {"layer": o, "expert": e, "tokens_measured": float(c)}
        for o, key in enumerate(["layer0", "layer2"])
        for e, c in enumerate(want[key])
    ]
    pd.DataFrame(rows).to_parquet(calib_dir / "coverage.parquet")
    match = quantize(model, calib_dir, tmp_path / "b")["coverage_match"]
    assert match["equal"] is True and match["max_abs_diff"] == 0
    rows[3]["tokens_measured"] += 3
    pd.DataFrame(rows).to_parquet(calib_dir / "coverage.parquet")
    assert quantize(model, calib_dir, tmp_path / "c")["coverage_match"] == {
        "equal": False,
        "max_abs_diff": 3,
        "path": str(calib_dir / "coverage.parquet"),
    }


def test_token_budget_takes_a_random_subset_not_a_prefix() -> None:
    rows = [[r] * 10 for r in range(100)]  # 100 distinct rows of 10 tokens
    picked = pick_rows(rows, 95, seed=0)
    assert sum(map(len, picked)) == 95 and len(picked) == 10  # the last row cut to fill the budget
    assert sorted(r[0] for r in picked) != list(range(10))
    assert pick_rows(rows[::-1], 95, seed=0) == picked  # independent of the Parquet's row order
    assert pick_rows(rows, 95, seed=1) != picked
    assert pick_rows(rows, None, seed=0) == rows


def test_long_rows_are_cut_into_windows_not_truncated() -> None:
    assert [len(w) for w in cut_windows([list(range(70)), [5, 6, 7]], 32)] == [32, 32, 6, 3]
    assert cut_windows([list(range(33))], 32) == [list(range(32))]  # a 1-token tail is no window
    ids = CalibRows(Path("x"), [list(range(70)), [1, 2]], from_input_ids=True)
    assert window_length(ids, None, 4096) == 70 and window_length(ids, None, 64) == 64
    text = CalibRows(Path("x"), [[1, 2]], from_input_ids=False)
    assert window_length(text, None, 4096) == 2048 and window_length(text, None, 256) == 256
    with pytest.raises(PascalError, match="max_position_embeddings"):
        window_length(text, 512, 256)
    w = calib_windows(ids, 32, None, 0)
    assert (w.rows_used, w.tokens_used, len(w.ids)) == (2, 72, 4)


def test_export_preflight_fails_before_any_work(calib_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """No compressed-tensors, or an --out that cannot be written: one line, nothing loaded, nothing left behind."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PascalError, match="cannot write to --out") as e:
        quantize(Path("/nonexistent/model"), calib_dir, blocker / "q")  # the model is never reached
    assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "compressed_tensors.compressors", None)  # import now fails
    with pytest.raises(PascalError, match="compressed-tensors is not importable"):
        quantize(Path("/nonexistent/model"), calib_dir, tmp_path / "new" / "q")
    assert not (tmp_path / "new").exists()
    with pytest.raises(PascalError, match="cannot load model|not found|model"):  # fake export needs no package
        quantize(Path("/nonexistent/model"), calib_dir, tmp_path / "new" / "q", export_format="fake")
    assert not (tmp_path / "new").exists()
