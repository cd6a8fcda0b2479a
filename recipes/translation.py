"""Fine-tune an upcycled model for translation: a decoder (GPT-2, Llama, Qwen, ...) with a prompt
format, or an encoder-decoder (Marian, NLLB / M2M100, mBART, BART, T5, mT5) as translators are.

    accelerate launch recipes/translation.py --config recipes/configs/translation_multi30k_smollm2.yaml
    accelerate launch recipes/translation.py --config recipes/configs/translation_multi30k_marian.yaml
    python recipes/translation.py --config recipes/configs/translation_multi30k_gpt2.yaml max_train_steps=20

The kind of model is read off its config (`is_encoder_decoder`, of a dense source or an upcycled
folder). Decoder: each example is `prompt(source) + " " + target + eos`; the loss covers the target
tokens only. Encoder-decoder: the source text goes to the encoder and the target is the decoder's
`labels`, no prompt; `--source_lang_code` / `--target_lang_code` set the language codes of mBART,
NLLB and M2M100 tokenizers (and force the target code as the first generated token where the
tokenizer starts targets with it).
Data: JSON lines `{"translation": {"en": ..., "de": ...}}`, line-aligned text pairs (`train.en` +
`train.de`, passed as `--train_file .../train`), or a Hub dataset with a `translation` column.
Reports sacreBLEU and chrF on greedy translations of the evaluation split, the teacher-forced
evaluation loss, routing statistics, and writes a Hub-ready output folder with a model card.
"""

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from hf_condcomp import metrics, training  # noqa: E402

DEFAULT_PROMPT = "Translate {source_lang} to {target_lang}.\n{source_lang}: {source}\n{target_lang}:"


# Data: JSON lines `{"translation": {"en": ..., "de": ...}}` or line-aligned plain text.

def load_translation_file(path, flag, source_lang, target_lang):
    """Returns a `datasets.Dataset` with a `translation` column of {source_lang, target_lang}."""
    import datasets

    path = Path(path)
    ext = path.suffix.lstrip(".").lower()
    if ext in ("json", "jsonl"):
        ds = training.load_table(path, flag)
        training.require_columns(ds, ["translation"], f"`{flag}` {path}", ["--train_file"])
        keys = set(ds[0]["translation"] or {})
        for lang, lang_flag in ((source_lang, "--source_lang"), (target_lang, "--target_lang")):
            if lang not in keys:
                raise training.RecipeError(
                    f"`{lang_flag}` {lang!r} is not a key of the `translation` records in `{flag}` {path}: they have "
                    f"{sorted(keys)}. Set `{lang_flag}` to one of them."
                )
        return ds
    # Plain text: `train.en` + `train.de`, passed as `train`, `train.en` or `train.de`.
    stem = str(path)
    for lang in (source_lang, target_lang):
        if stem.endswith("." + lang):
            stem = stem[: -len(lang) - 1]
    files = {lang: Path(f"{stem}.{lang}") for lang in (source_lang, target_lang)}
    for lang, file in files.items():
        if not file.is_file():
            others = sorted(p.name for p in Path(stem).parent.glob(Path(stem).name + ".*"))
            raise training.RecipeError(
                f"`{flag}` {path}: line-aligned text needs {file} for language {lang!r} (found {others or 'none'}). "
                "Check `--source_lang` / `--target_lang`, or pass JSON lines with a `translation` column."
            )
        training.check_file(file, flag)
    lines = {lang: file.read_text(encoding="utf-8").splitlines() for lang, file in files.items()}
    if len(lines[source_lang]) != len(lines[target_lang]):
        raise training.RecipeError(
            f"`{flag}`: {files[source_lang]} has {len(lines[source_lang])} lines but {files[target_lang]} has "
            f"{len(lines[target_lang])}; line-aligned files must match line for line."
        )
    pairs = [{source_lang: s, target_lang: t} for s, t in zip(lines[source_lang], lines[target_lang])
             if s.strip() and t.strip()]
    if not pairs:
        raise training.RecipeError(f"`{flag}` {path}: no non-empty line pairs.")
    return datasets.Dataset.from_dict({"translation": pairs})


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_common_arguments(parser)
    parser.add_argument("--source_lang", default="en")
    parser.add_argument("--target_lang", default="de")
    parser.add_argument("--prompt_template", default=DEFAULT_PROMPT,
                        help="with {source_lang}, {target_lang}, {source}; the target follows after a space")
    parser.add_argument("--max_target_length", type=int, default=64, help="new tokens generated per translation")
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--num_generation_samples", type=int, default=None,
                        help="evaluation examples translated for BLEU/chrF (default: all)")
    parser.add_argument("--source_lang_code", default=None,
                        help="encoder-decoder tokenizers with language codes: the source's (mBART `en_XX`, NLLB "
                             "`eng_Latn`, M2M100 `en`)")
    parser.add_argument("--target_lang_code", default=None,
                        help="the target's language code (`de_DE`, `deu_Latn`, `de`)")
    return parser


def language_codes(args, tokenizer):
    """Sets the tokenizer's `src_lang` / `tgt_lang` from `--source_lang_code` / `--target_lang_code`
    (mBART, NLLB, M2M100 tokenizers), and returns {"forced_bos_token_id": id of the target code} when
    the tokenizer starts targets with that code (mBART-50, NLLB, M2M100), so that generation starts in
    the target language; else {}."""
    lookup = getattr(tokenizer, "get_lang_id", tokenizer.convert_tokens_to_ids)  # M2M100 spells codes `__de__`
    ids = {}
    for attr, flag in (("src_lang", "--source_lang_code"), ("tgt_lang", "--target_lang_code")):
        code = getattr(args, flag[2:])
        if code is None:
            continue
        if not hasattr(tokenizer, attr):
            raise training.RecipeError(f"`{flag}` {code!r}: the tokenizer ({type(tokenizer).__name__}) has no "
                                       f"language codes (`{attr}`); leave `{flag}` out.")
        try:
            ids[attr] = lookup(code)
        except KeyError:
            ids[attr] = None
        if ids[attr] is None or ids[attr] == tokenizer.unk_token_id:
            raise training.RecipeError(f"`{flag}` {code!r} is not a language code of the tokenizer "
                                       f"({type(tokenizer).__name__}); use its code for the language (NLLB "
                                       "`deu_Latn`, mBART-50 `de_DE`, M2M100 `de`).")
        setattr(tokenizer, attr, code)
    if "tgt_lang" not in ids:
        return {}
    first = tokenizer(text_target="a")["input_ids"][:1]
    return {"forced_bos_token_id": ids["tgt_lang"]} if first == [ids["tgt_lang"]] else {}


def main(argv=None):
    """setup, train, evaluate, save: each a step below, read top to bottom."""
    args = training.parse_args(build_parser(), argv)
    training.validate_args(args)
    splits = load_pairs(args)  # checked for the language keys before anything expensive
    run = setup(args, splits)
    results = training.train(run.accelerator, run.model, run.optimizer, run.lr_scheduler, run.train_dataloader,
                             args, run.config)
    predictions = evaluate(run, args, splits, results)
    save(run, args, results, predictions)
    return results


def load_pairs(args) -> dict:
    """The splits as `translation` pairs, with the language keys checked."""
    src, tgt = args.source_lang, args.target_lang
    loader = partial(load_translation_file, source_lang=src, target_lang=tgt)
    splits = training.load_splits(args, loader=loader)
    for name, ds in splits.items():
        if "translation" not in ds.column_names and {src, tgt} <= set(ds.column_names):
            # Hub datasets that keep one column per language (bentrevett/multi30k: `en`, `de`).
            ds = splits[name] = ds.map(
                lambda batch: {"translation": [{src: a, tgt: b} for a, b in zip(batch[src], batch[tgt])]},
                batched=True, remove_columns=ds.column_names)
        training.require_columns(ds, ["translation"], f"{name} split", ["--train_file"])
        keys = set(ds[0]["translation"])
        if not {src, tgt} <= keys:
            raise training.RecipeError(f"{name} split: `--source_lang` / `--target_lang` {src!r}/{tgt!r} not in the "
                                       f"`translation` keys {sorted(keys)}; set them to one of those.")
    return splits


def load_translation_model(args, tokenizer):
    """(model, whether it is an encoder-decoder, the generation settings its language codes need)."""
    seq2seq = training.is_encoder_decoder(training.source_config(args))
    generate_kwargs = language_codes(args, tokenizer) if seq2seq else {}
    if seq2seq:
        model = training.load_model(args, AutoModelForSeq2SeqLM, "seq2seq-lm")
        if generate_kwargs:  # the saved model translates into the target language by default too
            model.generation_config.forced_bos_token_id = generate_kwargs["forced_bos_token_id"]
    else:
        model = training.load_model(args, AutoModelForCausalLM, "causal-lm")
    return training.apply_lora(model, args), seq2seq, generate_kwargs


def encoders(args, tokenizer):
    """(encode: texts -> ids ending in eos, prompt_ids: a source sentence -> the decoder's prompt ids).
    Tokenizers of translation models add their end (and language) tokens, which truncation keeps;
    others get eos appended."""
    adds_special = len(tokenizer("a")["input_ids"]) > len(tokenizer("a", add_special_tokens=False)["input_ids"])
    eos = [] if adds_special or tokenizer.eos_token_id is None else [tokenizer.eos_token_id]

    def encode(texts, side="text"):
        ids = tokenizer(**{side: texts}, truncation=True, max_length=args.max_length - len(eos))["input_ids"]
        return [i + eos for i in ids]

    def prompt_ids(source):
        return tokenizer(args.prompt_template.format(source_lang=args.source_lang, target_lang=args.target_lang,
                                                     source=source))["input_ids"]

    return encode, prompt_ids


def setup(args, splits) -> SimpleNamespace:
    """Accelerator, tokenizer, model, tokenized loaders, optimizer and schedule, prepared for the
    engine the launch set up."""
    src, tgt = args.source_lang, args.target_lang
    accelerator = training.make_accelerator(args)
    tokenizer = training.load_tokenizer(args)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model, seq2seq, generate_kwargs = load_translation_model(args, tokenizer)
    config = training.unwrap(accelerator, model).config
    encode, prompt_ids = encoders(args, tokenizer)

    def tokenize(examples):
        if seq2seq:  # source to the encoder, target as the decoder's labels
            pairs = examples["translation"]
            return {"input_ids": encode([p[src] for p in pairs]),
                    "labels": encode([p[tgt] for p in pairs], side="text_target")}
        out = {"input_ids": [], "labels": []}
        for pair in examples["translation"]:
            prompt = prompt_ids(pair[src])
            target = tokenizer(" " + pair[tgt])["input_ids"] + [tokenizer.eos_token_id]
            ids = (prompt + target)[: args.max_length]
            out["input_ids"].append(ids)
            out["labels"].append(([-100] * len(prompt) + target)[: args.max_length])
        return out

    with accelerator.main_process_first():
        processed = {name: ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"tokenize {name}")
                     for name, ds in splits.items()}
    collate = (training.seq2seq_collate if seq2seq else training.pad_collate)(tokenizer.pad_token_id)
    run = training.prepare_training(accelerator, args, model, processed, collate)
    training.start_run(accelerator, args, run.model, "translation", f"{len(processed['train'])} pairs {src}->{tgt}")
    run.__dict__.update(tokenizer=tokenizer, config=config, seq2seq=seq2seq, generate_kwargs=generate_kwargs,
                        encode=encode, prompt_ids=prompt_ids, num_train=len(processed["train"]))
    return run


def translate(run, args, sources: list[str]) -> list[str]:
    """Greedy (or beam) translations of `sources`, on every rank in step."""
    if run.seq2seq:
        hypotheses = training.generate(run.accelerator, run.model, run.tokenizer, run.encode(sources),
                                       args.max_target_length, args.per_device_eval_batch_size, args.num_beams,
                                       **run.generate_kwargs)
        return [h.strip() for h in hypotheses]
    hypotheses = training.generate(run.accelerator, run.model, run.tokenizer, [run.prompt_ids(s) for s in sources],
                                   args.max_target_length, args.per_device_eval_batch_size, args.num_beams,
                                   stop_strings=["\n"])
    return [h.split("\n")[0].strip() for h in hypotheses]  # the answer ends at the line break


def evaluate(run, args, splits, results) -> list[dict]:
    """Teacher-forced loss, then greedy translations scored by sacreBLEU and chrF, into `results`;
    returns the (source, reference, translation) rows."""
    accelerator, src, tgt = run.accelerator, args.source_lang, args.target_lang
    teacher_forced = training.evaluate_loss(accelerator, run.model, run.eval_dataloader)
    # BLEU on the test split when one is given (Multi30k: test 2016), else on the validation split.
    bleu_split = "test" if "test" in splits else "validation"
    pairs = splits[bleu_split]["translation"][: args.num_generation_samples]
    hypotheses = translate(run, args, [p[src] for p in pairs])
    references = [p[tgt] for p in pairs]
    scores = metrics.load("sacrebleu_scores").compute(predictions=hypotheses, references=references)
    rows = [{"source": p[src], "reference": r, "translation": h} for p, r, h in zip(pairs, references, hypotheses)]
    results.update(
        eval_loss=teacher_forced["loss"],
        eval_perplexity=teacher_forced["perplexity"],
        eval_bleu=scores["bleu"],
        eval_chrf=scores["chrf"],
        eval_samples=len(references),
        eval_bleu_split=bleu_split,
        eval_compute_fraction=teacher_forced["compute_fraction"],
        num_processes=accelerator.num_processes,
        encoder_decoder=run.seq2seq,
        samples=rows[:3],
        routing=training.routing_stats(accelerator, run.model, run.eval_dataloader, args.routing_eval_batches),
    )
    accelerator.print(json.dumps({k: results[k] for k in ("eval_bleu", "eval_chrf", "eval_loss", "train_loss")}))
    if args.with_tracking:
        accelerator.log({"eval/bleu": results["eval_bleu"], "eval/chrf": results["eval_chrf"]},
                        step=results["train_steps"])
    return rows


def save(run, args, results, predictions):
    """A complete Hub repository and its model card; then the push."""
    accelerator, src, tgt = run.accelerator, args.source_lang, args.target_lang
    saved = training.save_model(accelerator, run.model, run.tokenizer, args)
    training.write_results(args, results, accelerator)
    training.write_predictions(args, predictions, accelerator)
    if accelerator.is_main_process:
        if run.seq2seq:
            codes = f" (language codes {args.source_lang_code} -> {args.target_lang_code})" if (
                args.source_lang_code or args.target_lang_code) else ""
            how = f"Source text to the encoder, target as the decoder's labels{codes}; no prompt."
        else:
            how = (f"Prompt: `{args.prompt_template!r}`, target after a space, loss on target tokens only.")
        training.write_model_card(
            args, saved.config, results, task_type="translation", task_name=f"Translation {src}-{tgt}",
            metrics={"eval_bleu": "bleu", "eval_chrf": "chrf", "eval_loss": "loss"},
            data_text=f"{src} -> {tgt}, {run.num_train} training pairs. {how}",
        )
    training.push_to_hub(args, accelerator)
    training.end_training(accelerator, args)


if __name__ == "__main__":
    sys.exit(training.run_recipe(main))
