"""`synthesize --no-verify-routing`: EBSS-style self-sampling that keeps every screened passage."""

from __future__ import annotations

import pandas as pd
import pytest

from pascal_moe.agent.config import SynthesizeConfig
from pascal_moe.agent.loop import run
from pascal_moe.agent.self_sampling import unverified
from pascal_moe.agent.verify import SCREEN_REASONS, Rejections, judge, unmeasured
from pascal_moe.errors import PascalError


def test_unverified_accepts_below_threshold_and_keeps_screen_rejections() -> None:
    low = judge(100, [3, 7], [1, 50], targets=[3], baseline_rate=0.1, accept_ratio=1.5)  # rate 0.01 < 0.15
    high = judge(100, [3], [40], targets=[3], baseline_rate=0.1, accept_ratio=1.5)
    junk = unmeasured("repetition", 0.1, 1.5)
    assert not low.accepted and high.accepted
    rej = Rejections()
    got = unverified([low, high, junk], rej)
    assert [m.accepted for m in got] == [True, True, False]
    assert got[0].reject_reason is None and got[0].counts == [1, 50]  # routing still measured and kept
    assert got[2].reject_reason == "repetition"
    assert rej.counts == {"repetition": 1}


def test_self_synthesis_without_verification(qwen_dir, profile_dir, tmp_path) -> None:
    prof = profile_dir(qwen_dir)
    base = dict(
        model=str(qwen_dir),
        profile=str(prof),
        agent="self",
        rounds=1,
        samples_per_target=2,
        targets="sensitive",
        top_sensitive=4,
        group_size=4,
        accept_ratio=50.0,
        seq_len=64,
        self_tokens=16,
        device="cpu",
    )
    out = tmp_path / "ebss"
    df = pd.read_parquet(run(SynthesizeConfig(out=str(out), verify_routing=False, **base)))
    assert len(df) > 0
    screened = df["reject_reason"].isin(SCREEN_REASONS)
    assert df.loc[~screened, "accepted"].all()  # a 50x hit-rate bar would reject nearly all of them if checked
    assert (df.loc[~screened, "target_rate"] < df.loc[~screened, "accept_threshold"]).any()
    with pytest.raises(PascalError, match="different settings"):  # a verified run cannot resume an unverified one
        run(SynthesizeConfig(out=str(out), **base))
