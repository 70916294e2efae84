"""The model card: Hub metadata, the method/budget/size table, the quality table, how to load."""

from deltacomp.package.card import eval_markdown, load_eval, render_card


def manifest(**base):
    return {
        "deltacomp_version": "0.1.0", "method": "mixed",
        "base": {"source": "/models/base", "architecture": "llama/LlamaForCausalLM", **base},
        "budget": {"bits_per_entry": 1.0, "achieved_factor_bits_per_entry": 0.99,
                   "achieved_all_in_bits_per_entry": 1.1},
        "totals": {"compressed_modules": 14, "compressed_entries": 286720, "exact_modules": 5,
                   "package_tensor_bytes": 40000, "fp16_delta_bytes": 600000, "finetuned_weight_bytes": 2400000,
                   "ratio_vs_fp16_delta": 15.0, "ratio_vs_finetuned": 60.0},
    }


def metadata(card: str) -> list[str]:
    assert card.startswith("---\n")
    return card.split("---\n")[1].splitlines()


def test_metadata_names_a_hub_base_only():
    assert "base_model: org/base" in metadata(render_card(manifest(repo_id="org/base")))
    local = render_card(manifest())
    assert not any(x.startswith("base_model") for x in metadata(local))  # a local path is no Hub id
    # an old manifest's local absolute path shows as the folder's name only
    assert "`base`" in local and "/models/base" not in local and "library_name: deltacomp" in metadata(local)
    assert "base_model: org/other" in metadata(render_card(manifest(), base_model="org/other"))


def test_body_has_method_budget_sizes_and_use():
    card = render_card(manifest(repo_id="org/base"), repo_id="me/delta", peft_folder="peft")
    assert "- deltacomp-mixed" in metadata(card) and "- peft" in metadata(card)
    for text in ("| method | `mixed` |", "1 bits per entry", "0.9900 bits per entry", "39.1 KB", "60.00x",
                 "deltacomp apply me/delta --base org/base", "deltacomp pull me/delta",
                 'PeftModel.from_pretrained(base, "me/delta", subfolder="peft")', "AutoModelForCausalLM"):
        assert text in card, text
    assert "## Quality" not in card


def test_eval_table_from_eval_rows_a_list_or_flat_metrics(tmp_path):
    rows = [{"model": "base", "cos_mean": 0.5}, {"model": "mixed (package)", "cos_mean": 0.99, "cos_min": 0.9,
                                                  "package_bytes": 2_000_000, "error": {"mean": 0.05}}]
    table = eval_markdown({"kind": "encoder", "data": "sre text", "rows": rows})
    assert table.startswith("Evaluated on sre text.")
    assert "| model | MB | rel. error (mean) | cosine (mean) | cosine (min) |" in table
    assert "| mixed (package) | 2.00 | 0.0500 | 0.99000 | 0.90000 |" in table
    assert "| base | - | - | 0.50000 | - |" in table
    assert "| package | 0.97" in eval_markdown({"accuracy": 0.97})
    assert eval_markdown(rows).count("\n") == 3
    assert eval_markdown({"rows": []}) is None and eval_markdown("nonsense") is None
    m = manifest()
    assert load_eval(tmp_path, m) is None
    (tmp_path / "eval.json").write_text('{"rows": [{"model": "x", "ppl": 12.5}]}')
    assert load_eval(tmp_path, m) == {"rows": [{"model": "x", "ppl": 12.5}]}
    m["eval"] = {"rows": [{"model": "y", "top1": 0.9}]}
    card = render_card(m, evaluation=load_eval(tmp_path, m))
    assert "## Quality" in card and "| y | 0.9000 |" in card
