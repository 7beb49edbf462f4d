"""scripts/cheapest_mocan.py: the recipe grammar, the cheapest-that-meets rule, and the search on
its tiny --smoke comparison (recipes sharing K and prompts share their samples)."""

import json

import pandas as pd
import pytest


def test_a_recipe_reads_back_as_written_and_sets_its_sections(script):
    Recipe = script("cheapest_mocan").Recipe
    r = Recipe.parse("4:512:6:1:0.9")
    assert (r.k, r.prompts, r.pairs, r.epochs, r.confidence) == (4, 512, 6, 1, 0.9)
    assert r.name == "4:512:6:1:0.9" and r.samples_key == "4:512"
    assert r.overrides() == {"sample": {"num_samples": 4, "max_prompts": 512},
                             "train": {"pairs_per_prompt": 6, "num_epochs": 1}, "dual": {"confidence": 0.9}}
    default = Recipe.parse("8:all:28:3")
    assert default.prompts is None and default.confidence is None and default.name == "8:all:28:3"


@pytest.mark.parametrize("text", ["8:all:28", "8:all:29:3", "1:all:0:3", "8:ten:28:3", "8:all:28:0",
                                  "8:all:28:3:0.4", "8:all:28:3:1.0", "8:0:28:3"])
def test_a_bad_recipe_is_refused_with_its_text(script, text):
    with pytest.raises(ValueError, match="recipe"):
        script("cheapest_mocan").Recipe.parse(text)


def test_the_cheapest_is_the_fewest_flops_among_the_recipes_that_meet_and_land(script):
    cheapest = script("cheapest_mocan").cheapest
    rows = pd.DataFrame({"recipe": ["a", "b", "c", "d"], "met": [True, False, True, True],
                         "lands": [True, True, True, False], "flops": [3.0, 1.0, 2.0, 0.5]})
    assert cheapest(rows)["recipe"] == "c"                       # b misses, d overshoots its prediction
    assert cheapest(rows, lands=False)["recipe"] == "d"
    assert cheapest(rows.assign(met=False)) is None


def test_a_recipe_lands_only_when_every_seeds_reward_prediction_is_inside_its_achieved_ci(script):
    landing = script("cheapest_mocan").landing

    def report(achieved, predicted, inside, kl):
        return {"predicted_reward": {"achieved_change": achieved, "predicted_change": predicted,
                                     "prediction_in_achieved_ci": inside}, "kl": {"predicted": kl}}

    both = landing([report(-2.0, -2.5, True, 0.8), report(-3.0, -2.5, True, 1.0)])
    assert both == {"reward_change": -2.5, "reward_change_predicted": -2.5, "kl_predicted": 0.9, "lands": True}
    assert landing([report(-2.0, -2.5, True, 0.8), report(-7.0, -2.5, False, 0.8)])["lands"] is False


def test_the_smoke_search_runs_each_recipe_and_shares_samples_of_the_same_k_and_prompts(script, tmp_path):
    script("cheapest_mocan").main(["--smoke", "--seeds", "0", "--out", str(tmp_path)])
    table = pd.read_csv(tmp_path / "cheapest.csv")
    assert list(table["recipe"]) == ["3:all:3:1", "3:all:1:2", "4:3:2:1"]
    assert (table["flops"] > 0).all() and table["wall_s"].notna().all()
    recipes = tmp_path / "recipes"
    first = pd.read_parquet(recipes / "3_all_3_1" / "shared" / "samples.parquet")
    shared = pd.read_parquet(recipes / "3_all_1_2" / "shared" / "samples.parquet")
    other = pd.read_parquet(recipes / "4_3_2_1" / "shared" / "samples.parquet")
    pd.testing.assert_frame_equal(first, shared)                 # copied, not drawn again
    assert other["prompt_id"].nunique() == 3 and len(other) == 3 * 4
    record = json.loads((tmp_path / "cheapest.json").read_text())
    ok = table[table["met"] & table["lands"]]
    assert record["cheapest"] == (ok.sort_values("flops")["recipe"].iloc[0] if len(ok) else None)
    assert set(table.columns) >= {"lands", "reward_change", "reward_change_predicted", "kl_predicted"}
    assert (tmp_path / "cheapest.png").stat().st_size > 0


def test_a_recipe_its_dual_finds_infeasible_is_listed_and_the_others_still_run(script, tmp_path):
    script("cheapest_mocan").main(["--smoke", "--seeds", "0", "--recipes", "3:all:3:1", "3:all:3:1:0.999", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "cheapest.json").read_text())
    assert record["infeasible"] == ["3:all:3:1:0.999"]
    assert list(pd.read_csv(tmp_path / "cheapest.csv")["recipe"]) == ["3:all:3:1"]
    assert not (tmp_path / "recipes" / "3_all_3_1_0.999" / "runs").exists()   # nothing trained
