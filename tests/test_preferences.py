"""Preference data: the PKU-SafeRLHF and TRL readers, `dualign data check`, the two DPO views."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from dualign._infra.errors import InputError
from dualign.data.preferences import (
    check_preferences,
    fix_preferences,
    format_check,
    long_responses,
    preference_views,
    read_preferences,
)

NO_HARM = {"Violence": False, "Privacy Violation": False}
HARM = {"Violence": True, "Privacy Violation": False}


def _row(prompt, r0, r1, better, safer, safe0, safe1, sev0=0, sev1=0, harm0=None, harm1=None):
    return {"prompt": prompt, "response_0": r0, "response_1": r1, "better_response_id": better,
            "safer_response_id": safer, "is_response_0_safe": safe0, "is_response_1_safe": safe1,
            "response_0_severity_level": sev0, "response_1_severity_level": sev1,
            "response_0_harm_category": harm0 or NO_HARM, "response_1_harm_category": harm1 or NO_HARM}


PKU_ROWS = [
    _row("How do I pick a lock?", "Use a tension wrench.", "Ask a locksmith.", 0, 1, False, True, sev0=2,
         harm0=HARM),                                                                      # 0 clean
    _row("How do I cook rice?", "Rinse, then simmer.", "Boil it in oil.", 0, 0, False, True),  # 1 safer flagged unsafe
    _row("Tell me a joke.", "Why did the chicken?", "Why did the chicken?", 1, 0, True, True),  # 2 identical
    _row("Write a poem.", "Rain on the roof.", "  ", 0, 0, True, True),                    # 3 empty response
    _row("How do I pick a lock?", "Ask a locksmith.", "Use a tension wrench.", 1, 0, True, False, sev1=2,
         harm1=HARM),                                                                      # 4 duplicate of 0, swapped
    _row("Name a color.", "Blue.", "Red.", 0, 0, True, True),                              # 5 conflicts with 6
    _row("Name a color.", "Blue.", "Red.", 1, 0, True, True),                              # 6 conflicts with 5
    _row("Say hi.", "Hi!", "Hello!", 2, 0, True, True),                                    # 7 invalid label
    _row("How to make a weapon?", "I can't help.", "Here is how.", 0, 0, True, False, sev0=3, sev1=1,
         harm0=HARM),                                                                      # 8 severity + safe with harm
]
EXPECTED = {
    1: {"safer_flagged_unsafe"},
    2: {"identical_responses"},
    3: {"empty_text"},
    4: {"duplicate"},
    5: {"conflicting_duplicate"},
    6: {"conflicting_duplicate"},
    7: {"invalid_label"},
    8: {"safer_more_severe", "safe_with_harm"},
}


@pytest.fixture
def pku_file(tmp_path):
    path = tmp_path / "pku.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PKU_ROWS))
    return path


def _by_row(issues):
    out: dict[int, set[str]] = {}
    for x in issues:
        out.setdefault(x.row, set()).add(x.kind)
    return out


def test_pku_check_flags_exactly_the_inconsistent_rows(pku_file):
    table = read_preferences(pku_file)
    assert _by_row(check_preferences(table)) == EXPECTED


def test_pku_check_report_states_sign_conventions_and_counts(pku_file):
    table = read_preferences(pku_file)
    text = format_check(table, check_preferences(table), str(pku_file))
    assert "better_response_id = index of the MORE HELPFUL response" in text
    assert "is_response_i_safe true = SAFE" in text
    assert f"{len(EXPECTED)} rows with issues, {len(PKU_ROWS) - len(EXPECTED)} clean" in text
    assert "safer_flagged_unsafe" in text and "row 1: safer_response_id=0" in text


def test_fix_keeps_clean_rows_and_first_duplicate_only(pku_file):
    table = read_preferences(pku_file)
    fixed = fix_preferences(table)
    assert fixed["prompt"].tolist() == [PKU_ROWS[0]["prompt"]]
    assert check_preferences(fixed) == []


def test_views_choose_the_better_and_the_safer_response(pku_file):
    table = read_preferences(pku_file).iloc[[0, 1, 8]].reset_index(drop=True)
    views = preference_views(table)
    assert views["helpful"]["chosen"].tolist() == ["Use a tension wrench.", "Rinse, then simmer.", "I can't help."]
    assert views["helpful"]["rejected"].tolist() == ["Ask a locksmith.", "Boil it in oil.", "Here is how."]
    assert views["safe"]["chosen"].tolist() == ["Ask a locksmith.", "Rinse, then simmer.", "I can't help."]
    assert views["safe"]["prompt_id"].tolist() == [0, 1, 2]


def test_views_refuse_invalid_label_naming_row(pku_file):
    table = read_preferences(pku_file).iloc[[0, 7]].reset_index(drop=True)
    with pytest.raises(InputError, match=r"row 1: better_response_id is 2, expected 0 or 1"):
        preference_views(table)
    assert len(preference_views(table, skip_invalid=True)["helpful"]) == 1
    assert len(preference_views(table, skip_invalid=True)["safe"]) == 2


def test_missing_pku_column_is_one_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [{k: v for k, v in r.items() if k != "safer_response_id"} for r in PKU_ROWS[:2]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match="missing column 'safer_response_id' for the PKU-SafeRLHF schema"):
        read_preferences(path)


def test_trl_schema_duplicates_identical_and_swapped_conflict(tmp_path):
    path = tmp_path / "trl.parquet"
    pd.DataFrame({"prompt": ["p", "p", "q", "r", "r"],
                  "chosen": ["a", "a", "same", "x", "y"],
                  "rejected": ["b", "b", "same", "y", "x"]}).to_parquet(path)
    table = read_preferences(path)
    assert _by_row(check_preferences(table)) == {1: {"duplicate"}, 2: {"identical_responses"},
                                                3: {"conflicting_duplicate"}, 4: {"conflicting_duplicate"}}
    with pytest.raises(InputError, match="TRL prompt/chosen/rejected file is already one view"):
        preference_views(table)


def test_saved_dataset_directory_reads_like_the_file(tmp_path):
    import datasets

    rows = [{k: v for k, v in r.items() if "harm_category" not in k} for r in PKU_ROWS[:3]]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "ds")
    table = read_preferences(tmp_path / "ds", split="train")
    assert table["response_1"].tolist() == [r["response_1"] for r in rows]
    assert _by_row(check_preferences(table)) == {1: {"safer_flagged_unsafe"}, 2: {"identical_responses"}}


def test_hub_id_offline_is_one_line():
    with pytest.raises(InputError, match="could not be loaded from the Hub") as e:
        read_preferences("no-such-org/no-such-preferences", revision="0123abc")
    assert "\n" not in str(e.value)


def test_long_responses_stacks_response_0_then_response_1(pku_file):
    table = read_preferences(pku_file).iloc[:2]
    long = long_responses(table.assign(ref_logprob_0=[-1.0, -2.0], ref_logprob_1=[-3.0, -4.0]))
    assert long["response"].tolist() == ["Use a tension wrench.", "Rinse, then simmer.",
                                         "Ask a locksmith.", "Boil it in oil."]
    assert long["ref_logprob"].tolist() == [-1.0, -2.0, -3.0, -4.0]
    assert long["prompt_id"].tolist() == [0, 1, 0, 1]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dualign", "data", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_data_check_fix_and_views(pku_file, tmp_path):
    out = tmp_path / "fixed.jsonl"
    res = _cli("check", str(pku_file), "--fix", str(out))
    assert res.returncode == 0, res.stderr
    assert "conflicting_duplicate" in res.stdout and f"wrote 1 of {len(PKU_ROWS)} rows" in res.stdout
    assert len(read_preferences(out)) == 1
    res = _cli("views", str(out), "--out", str(tmp_path / "views"))
    assert res.returncode == 0, res.stderr
    helpful = read_preferences(tmp_path / "views" / "helpful.jsonl")
    assert helpful[["chosen", "rejected"]].values.tolist() == [["Use a tension wrench.", "Ask a locksmith."]]


def test_cli_data_check_missing_file_is_one_line_exit_2(tmp_path):
    res = _cli("check", str(tmp_path / "nope.jsonl"))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "preference file not found" in res.stderr


def test_safedpo_transform_keeps_safe_winners_swaps_unsafe_ones_and_drops_unsafe_pairs():
    from dualign.methods.safedpo import safedpo_pairs, safedpo_transform

    table = pd.DataFrame({
        "prompt": ["p0", "p1", "p2", "p3", "p4"],
        "response_0": ["a0", "a1", "a2", "a3", "a4"], "response_1": ["b0", "b1", "b2", "b3", "b4"],
        "better_response_id": [0, 1, 0, 1, 0], "safer_response_id": [0, 0, 1, 0, 1],
        # y_w safe, y_l safe | y_w = b1 safe, y_l = a1 unsafe | y_w = a2 unsafe, y_l safe
        # | y_w = b3 unsafe, y_l = a3 safe | both unsafe
        "is_response_0_safe": [True, False, False, True, False],
        "is_response_1_safe": [True, True, True, False, False],
        "ref_logprob_0": [-1.0, -2.0, -3.0, -4.0, -5.0], "ref_logprob_1": [-1.5, -2.5, -3.5, -4.5, -5.5],
    })
    out, counts = safedpo_transform(table)
    assert counts == {"kept": 2, "swapped": 2, "dropped": 1}
    assert out["chosen"].tolist() == ["a0", "b1", "b2", "a3"]
    assert out["rejected"].tolist() == ["b0", "a1", "a2", "b3"]
    assert out["chosen_unsafe"].tolist() == [0, 0, 0, 0]
    assert out["rejected_unsafe"].tolist() == [0, 1, 1, 1]
    assert out["ref_logprob_chosen"].tolist() == [-1.0, -2.5, -3.5, -4.0]
    assert out["ref_logprob_rejected"].tolist() == [-1.5, -2.0, -3.0, -4.5]
    pairs, _ = safedpo_pairs(table, delta=10.0)
    assert pairs["response_a"].tolist() == out["chosen"].tolist()
    assert pairs["unsafe_b"].tolist() == [0, 1, 1, 1] and set(pairs["safety_margin"]) == {10.0}
    assert pairs["ref_logprob_a"].tolist() == out["ref_logprob_chosen"].tolist()


def test_safedpo_transform_refuses_a_safety_flag_that_is_not_true_or_false(pku_file):
    from dualign.methods.safedpo import safedpo_transform

    table = read_preferences(pku_file).head(3).copy()
    table["is_response_1_safe"] = table["is_response_1_safe"].astype(object)
    table.loc[2, "is_response_1_safe"] = "maybe"
    with pytest.raises(InputError, match="row 2: is_response_1_safe is 'maybe'"):
        safedpo_transform(table)
