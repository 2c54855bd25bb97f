"""Where text and bundled assets come from: the data-dir resolver, hub specs, streaming, empty --data.

Why: an installed wheel has no data/ folder, so the bundled defaults must be found by
`$PASCAL_DATA_DIR` or fail with one line saying how; a hub dataset must accept a config
(`wikitext:wikitext-2-raw-v1`) and a split, and must not be downloaded whole to keep
a few hundred rows. No network exists here: streaming runs on a local dataset folder.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pascal_moe.errors import PascalError
from pascal_moe.io import bundled
from pascal_moe.io.texts import HubSpec, _read_hub, load_texts, parse_hub, should_stream
from pascal_moe.preflight.checks import check_data

REPO = Path(__file__).resolve().parents[1]


def test_checkout_data_is_found_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(bundled.ENV, raising=False)
    assert bundled.data_dir() == REPO / "data"
    assert bundled.bundled_seed() == REPO / "data" / "seed" / "seed.parquet"
    assert (bundled.bundled_models() / "qwen3-moe-tiny" / "config.json").is_file()


def test_env_var_overrides_and_missing_data_says_how(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "seed").mkdir()
    monkeypatch.setenv(bundled.ENV, str(tmp_path))
    assert bundled.data_dir() == tmp_path
    with pytest.raises(PascalError, match="seed corpus .* is missing: set PASCAL_DATA_DIR"):
        bundled.bundled_seed()
    with pytest.raises(PascalError, match="no bundled models"):
        bundled.bundled_models()
    assert check_data(None).status == "error" and bundled.ENV in check_data(None).detail
    monkeypatch.setenv(bundled.ENV, str(tmp_path / "nowhere"))
    with pytest.raises(PascalError, match="holds no models/ or seed/"):
        bundled.data_dir()
    # a wheel install: no env var and no checkout data/ next to the package
    monkeypatch.delenv(bundled.ENV)
    monkeypatch.setattr(bundled, "CHECKOUT_DATA", tmp_path / "site-packages" / "data")
    with pytest.raises(PascalError, match=r"^no bundled data \(an installed wheel does not carry it\): set"):
        load_texts(None)


@pytest.mark.parametrize("data", ["", "  "])
def test_empty_data_is_an_error_not_a_hub_lookup(data: str) -> None:
    with pytest.raises(PascalError, match="--data is empty"):
        load_texts(data)
    assert check_data(data).status == "error"


def test_hub_spec_name_config_and_split() -> None:
    assert parse_hub("wikitext:wikitext-2-raw-v1") == HubSpec("wikitext", "wikitext-2-raw-v1", "train")
    assert parse_hub("allenai/c4", "validation") == HubSpec("allenai/c4", None, "validation")
    for bad in ("wikitext:", ":cfg", "a:b:c"):
        with pytest.raises(PascalError, match="write name or name:config"):
            parse_hub(bad)
    assert check_data("wikitext:").status == "error"
    assert "config wikitext-2-raw-v1" in check_data("wikitext:wikitext-2-raw-v1").detail


def test_streaming_decision() -> None:
    assert not should_stream(None, 10**9)  # everything wanted: download
    assert not should_stream(400, 3_000)  # a small split: download it whole
    assert should_stream(400, 10**7)  # 400 rows of a huge split: stream
    assert should_stream(400, None)  # size unknown (offline, no metadata): stream


def test_streams_first_nonempty_rows_of_a_local_dataset(tmp_path: Path) -> None:
    """`datasets` streaming on a dataset folder (no network): keeps only the first non-empty rows."""
    ds = tmp_path / "ds" / "data"
    ds.mkdir(parents=True)
    pd.DataFrame({"text": ["", "a b c", "  ", "d e", "f", "g"], "n": range(6)}).to_parquet(ds / "train-0.parquet")
    df = _read_hub(str(tmp_path / "ds"), None, "text", keep_rows=2)
    assert df["text"].tolist() == ["a b c", "d e"]
    with pytest.raises(PascalError, match="no column 'body'.*--text-column"):
        _read_hub(str(tmp_path / "ds"), None, "body", keep_rows=2)
    with pytest.raises(PascalError, match="split 'test'"):
        _read_hub(str(tmp_path / "ds"), "test", "text", keep_rows=2)
