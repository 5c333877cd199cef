"""The paper's prompt sets and the DrawBench CSV loader."""

import pytest

from common.prompts import PromptSetError, load_prompts


def test_paper_prompt_sets():
    animals = load_prompts("simple_animals")
    assert len(animals) == 45 == len(set(animals)) and animals[:3] == ["cat", "dog", "horse"]
    pairs = load_prompts("animals_activities")
    assert len(pairs) == 135 == len(set(pairs))
    assert "a monkey washing the dishes" in pairs and "an ant playing chess" in pairs


def test_drawbench_csv_loads_its_prompts_column(tmp_path):
    f = tmp_path / "drawbench.csv"
    f.write_text('Prompts,Category\nA red colored car.,Colors\n"A storefront with ""DrawBench"" written on it.",Text\n')
    assert load_prompts(str(f)) == ["A red colored car.", 'A storefront with "DrawBench" written on it.']
    bad = tmp_path / "other.csv"
    bad.write_text("prompt,category\na cat,animals\n")
    with pytest.raises(PromptSetError, match=r"other.csv: no column 'Prompts' \(columns: prompt, category\)"):
        load_prompts(str(bad))
