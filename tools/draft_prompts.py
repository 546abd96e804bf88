"""Build the draft model's prompt set from offline text on this machine.

No dataset is downloadable, so prompts come from what a Debian box with Python already holds: the
standard library's sources and docstrings, the documentation topics shipped in `pydoc_data`, the KJV
Bible (`apt-get install bible-kjv-text`, read through its `bible` program), Jane Austen's novels
(`apt-get install r-cran-janeaustenr`, read through `Rscript`), and instruction prompts written here
(templates x topics). Missing sources are skipped with a warning.

Held-out prompts share no template, topic, stdlib module, book or Bible book with the training
prompts, so the measured acceptance is not inflated by near-duplicates. Besides chat prompts, a
`text` split holds plain passages the target is run over (prefill only) for cheap extra signal.

    python -m tools.draft_prompts --out data/draft --seed 0
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import random
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path

MAX_CHARS = 1200  # source passages longer than this are cut (prompt stays well under 512 tokens)


def listed(text: str) -> list[str]:
    """A ';'-separated list written across lines (line breaks count as spaces)."""
    return [" ".join(s.split()) for s in text.split(";") if s.strip()]


TOPICS = listed(
    """
photosynthesis; the water cycle; black holes; plate tectonics; the immune system; vaccines; climate change;
renewable energy; solar panels; wind turbines; electric cars; the internet; how email works; encryption;
public key cryptography; blockchain; machine learning; neural networks; large language models; compilers;
operating systems; databases; version control with git; cloud computing; virtual machines; containers; the
French Revolution; the Roman Empire; the printing press; the industrial revolution; the Renaissance; ancient
Egypt; the Silk Road; the Cold War; the moon landing; democracy; inflation; supply and demand; compound
interest; budgeting; saving for retirement; healthy sleep; meditation; regular exercise; a balanced diet;
drinking enough water; learning a new language; time management; public speaking; job interviews; writing a
resume; remote work; teamwork; leadership; giving feedback; negotiation; volcanoes; earthquakes; hurricanes;
coral reefs; rainforests; deserts; honey bees; migratory birds; dolphins; elephants; the human heart; the
human brain; DNA; evolution; antibiotics; the periodic table; chemical reactions; gravity; electricity;
magnetism; light and color; sound waves; the speed of light; relativity; quantum computing; prime numbers;
probability; statistics; the Pythagorean theorem; calculus; graph theory; sorting algorithms; binary search;
recursion; hash tables; linked lists; big O notation; unit testing; code review; technical debt; open source
software; the history of computers; the telescope; the solar system; Mars exploration; satellites; GPS; bread
baking; making coffee; growing tomatoes; composting; recycling; urban gardening; bicycles; trains; airplanes
and lift; bridges; skyscrapers; the Olympic Games; chess; jazz music; classical music; photography; painting
with watercolors; reading more books; keeping a journal; friendship; kindness; curiosity; critical thinking;
the scientific method; museums; libraries; national parks; tea; chocolate; cheese making; fermentation;
sourdough; the seasons; tides; clouds; rainbows; snowflakes; the northern lights; volunteering; first aid;
fire safety
"""
)

HELD_OUT_TOPICS_EXTRA = listed(
    """
the Great Wall of China; octopuses; the stock market; origami; lighthouses; glaciers; the violin; typography;
beekeeping; submarines; the human skeleton; spreadsheets; marathon running
"""
)

CODE_TASKS = listed(
    """
reverses a string; checks whether a number is prime; returns the n-th Fibonacci number; counts the words in a
text; removes duplicates from a list while keeping order; merges two sorted lists; flattens a nested list;
computes the average of a list of numbers; finds the largest element in a list; checks whether a string is a
palindrome; converts Celsius to Fahrenheit; reads a CSV file into a list of dictionaries; sorts a list of
dictionaries by a key; computes the factorial of a number; returns the greatest common divisor of two numbers;
splits a list into chunks of a given size; counts how often each character appears in a string; validates an
email address with a regular expression; finds all anagrams of a word in a list; implements binary search;
implements bubble sort; implements a stack class; implements a queue with two stacks; parses a date string
into a datetime; returns the most common element in a list; transposes a matrix; checks whether two strings
are anagrams; computes the sum of the digits of a number; generates a random password; retries a function call
up to three times; measures how long a function takes; caches the results of a slow function; walks a
directory and lists all Python files; downloads nothing but formats a file size in human-readable units;
converts a Roman numeral to an integer; converts an integer to binary; rotates a list by k positions; finds
the second largest number in a list; checks whether brackets in a string are balanced; computes the dot
product of two vectors; capitalizes the first letter of every word; truncates text to a maximum length; groups
words by their first letter; computes a running total of a list; finds the intersection of two lists; counts
the lines in a file; removes punctuation from a string; checks whether a year is a leap year
"""
)

HELD_OUT_CODE_TASKS = listed(
    """
computes the median of a list; converts a string to snake_case; finds the longest word in a sentence; checks
whether a list is sorted; returns the prime factors of a number; merges two dictionaries
"""
)

PAIRS = listed(
    """
Python and JavaScript; lists and tuples; TCP and UDP; RAM and disk storage; weather and climate; viruses and
bacteria; a democracy and a monarchy; stocks and bonds; cats and dogs as pets; tea and coffee; renting and
buying a home; trains and planes for travel; SQL and NoSQL databases; processes and threads; compiled and
interpreted languages; nuclear and solar power; mitosis and meiosis; speed and velocity; a simile and a
metaphor; fiction and non-fiction; email and instant messaging; a laptop and a desktop
"""
)

HELD_OUT_PAIRS = listed(
    """
rivers and lakes; HTTP and HTTPS; sharks and whales; a novel and a short story
"""
)

ACTIVITIES = listed(
    """
studying for an exam; cooking dinner quickly; staying focused at work; sleeping better; learning to code;
saving money; starting a garden; running a first 5k; writing clearly; making friends in a new city; keeping a
tidy home; preparing for a trip; debugging a program; reading faster; staying motivated
"""
)

HELD_OUT_ACTIVITIES = listed(
    """
packing a suitcase; taking better photos; learning to swim; organising a party
"""
)

QUESTIONS = listed(
    """
Why is the sky blue?; How do airplanes stay in the air?; What causes the seasons?; How do magnets work?; Why
do we dream?; How does a refrigerator keep food cold?; What is a computer virus?; How do plants grow?; Why do
leaves change color in autumn?; How does the heart pump blood?; What is an algorithm?; How does a search
engine work?; Why is exercise good for you?; What makes a good password?; How do vaccines protect us?; What is
the difference between a byte and a bit?; Why does ice float?; How do bees make honey?; What is a function in
programming?; How do tides work?; What is inflation?; Why do cats purr?; How does a microwave oven heat food?;
What is the capital of France and why is it famous?
"""
)

HELD_OUT_QUESTIONS = listed(
    """
Why is the ocean salty?; How does a camera take a picture?; What is a black hole made of?; How do birds know
where to migrate?; What is a variable in Python?; Why do we have time zones?
"""
)

TRAIN_TOPIC_TEMPLATES = [
    "Explain {x} in simple terms.",
    "Write a short paragraph about {x}.",
    "List five interesting facts about {x}.",
    "What are the most important things to know about {x}?",
    "Give a brief history of {x}.",
    "Write a short poem about {x}.",
    "Explain {x} to a ten-year-old.",
    "What are common misconceptions about {x}?",
    "Write a blog post introduction about {x}.",
    "Summarise what {x} is in one paragraph.",
]
HELD_OUT_TOPIC_TEMPLATES = [
    "Can you help me understand {x}?",
    "I'm a beginner. What should I know about {x}?",
    "Describe {x} in three sentences.",
]
TRAIN_CODE_TEMPLATES = [
    "Write a Python function that {x}.",
    "Write a Python function that {x}. Include a docstring.",
    "How would you write a function in Python that {x}? Explain your code.",
]
HELD_OUT_CODE_TEMPLATES = ["I need a small Python helper that {x}. Can you write it and show an example call?"]
TRAIN_PAIR_TEMPLATES = ["Compare {x}.", "What is the difference between {x}?", "What are the pros and cons of {x}?"]
HELD_OUT_PAIR_TEMPLATES = ["How do {x} differ?"]
TRAIN_ACTIVITY_TEMPLATES = [
    "Give me three tips for {x}.",
    "What is a good plan for {x}?",
    "List some mistakes to avoid when {x}.",
]
HELD_OUT_ACTIVITY_TEMPLATES = ["Any advice for {x}?"]

TRAIN_FUNC_TEMPLATES = [
    "Explain what this Python function does:\n\n```python\n{x}\n```",
    "Add comments to this Python code:\n\n```python\n{x}\n```",
    "Suggest a unit test for this function:\n\n```python\n{x}\n```",
    "What could go wrong with this code?\n\n```python\n{x}\n```",
]
HELD_OUT_FUNC_TEMPLATES = ["Describe step by step what the following code does.\n\n```python\n{x}\n```"]
TRAIN_DOC_TEMPLATES = [
    "Summarise this documentation:\n\n{x}",
    "Explain this in plain English:\n\n{x}",
    "Write a Python function that does the following: {x}",
]
HELD_OUT_DOC_TEMPLATES = ["Here is some Python documentation. What is it about?\n\n{x}"]
TRAIN_PASSAGE_TEMPLATES = [
    "Summarise this passage:\n\n{x}",
    "Rewrite this passage in modern plain English:\n\n{x}",
    "What is the main idea of this passage?\n\n{x}",
    "Who is mentioned in this passage, and what do they do?\n\n{x}",
    "Continue this story for a few sentences:\n\n{x}",
]
HELD_OUT_PASSAGE_TEMPLATES = [
    "Explain the meaning of the following text to a child:\n\n{x}",
    "Give three key points from this text:\n\n{x}",
]

AUSTEN_HELD_OUT = {"Persuasion"}
BIBLE_BOOKS = {  # name for the `bible` program -> number of chapters
    "Gen": 50, "Exo": 40, "Lev": 27, "Num": 36, "Deut": 34, "Josh": 24, "Judg": 21, "Ruth": 4, "1Sam": 31,
    "2Sam": 24, "1Kings": 22, "2Kings": 25, "Esther": 10, "Job": 42, "Psalms": 150, "Prov": 31, "Eccl": 12,
    "Isaiah": 66, "Jer": 52, "Dan": 12, "Jonah": 4, "Matt": 28, "Mark": 16, "Luke": 24, "John": 21, "Acts": 28,
    "Rom": 16, "1Cor": 16, "Gal": 6, "Jas": 5, "Rev": 22,
}  # fmt: skip
BIBLE_HELD_OUT = {"Ruth", "Jonah", "Jas"}


def warn(msg: str) -> None:
    print(f"draft_prompts: {msg}", file=sys.stderr)


def stable_bucket(key: str, n: int) -> int:
    """A bucket that does not depend on PYTHONHASHSEED."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") % n


def clip(text: str, limit: int = MAX_CHARS) -> str:
    text = text.strip()
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = max(cut.rfind("\n"), cut.rfind(". "))
    return cut[: end + 1].strip() if end > limit // 2 else cut.strip()


# --- sources -----------------------------------------------------------------------------------


def stdlib_items() -> Iterator[tuple[str, str, str]]:
    """(module, kind, text): function sources with docstrings, and docstrings of modules/classes/functions."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "ensurepip"}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip & set(rel.parts) or any(p.startswith("_") and p != "__init__.py" for p in rel.parts[:-1]):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if doc := ast.get_docstring(tree):
            yield module, "doc", doc
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 40:
                continue
            yield module, "doc", doc
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                lines = source.splitlines()[node.lineno - 1 : node.end_lineno]
                seg = textwrap.dedent("\n".join(lines))
                if 80 <= len(seg) <= MAX_CHARS:
                    yield module, "func", seg


def pydoc_topics() -> dict[str, str]:
    """The language reference sections Python ships for help() (pydoc_data.topics)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        warn("pydoc_data not found; skipping the Python documentation topics")
        return {}
    return dict(sorted(topics.items()))


def bible_passages() -> Iterator[tuple[str, str]]:
    """(book, passage of ~8 verses) from the `bible` program of bible-kjv."""
    if shutil.which("bible") is None:
        warn("`bible` not found (apt-get install bible-kjv-text); skipping the KJV")
        return
    for book, chapters in BIBLE_BOOKS.items():
        out = subprocess.run(
            ["bible", "-l100000", f"{book}1:1-{book}{chapters}:999"], capture_output=True, text=True, check=False
        ).stdout
        # Verses are indented ("  3 And God said ..."); chapter headings ("1 Samuel 2") are not.
        verses = [
            line.split(None, 1)[1] for line in out.splitlines() if line[:1] == " " and line.split(None, 1)[0].isdigit()
        ]
        for i in range(0, len(verses), 8):
            yield book, " ".join(verses[i : i + 8])


def austen_paragraphs() -> Iterator[tuple[str, str]]:
    """(book, paragraph) from janeaustenr, read through Rscript."""
    if shutil.which("Rscript") is None:
        warn("Rscript not found (apt-get install r-cran-janeaustenr); skipping Jane Austen")
        return
    script = 'd <- janeaustenr::austen_books(); cat(paste(d$book, d$text, sep="\\t"), sep="\\n")'
    res = subprocess.run(["Rscript", "-e", script], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        warn(f"janeaustenr not readable ({res.stderr.strip()[:200]}); skipping Jane Austen")
        return
    book, para = "", []
    for line in [*res.stdout.splitlines(), "\t"]:
        b, _, text = line.partition("\t")
        if (not text.strip() or b != book) and para:
            joined = " ".join(para)
            if len(joined) > 200 and not joined.isupper():
                yield book, joined
            para = []
        book = b
        if text.strip():
            para.append(text.strip())


# --- assembly ----------------------------------------------------------------------------------


def build(seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    rng = random.Random(seed)
    train: list[dict] = []
    held: list[dict] = []
    text: list[dict] = []

    def add(split: list[dict], source: str, template: str, x: str) -> None:
        split.append({"source": source, "template": template, "prompt": template.replace("{x}", x)})

    topics = TOPICS
    held_topics = set(rng.sample(topics, len(topics) // 8)) | set(HELD_OUT_TOPICS_EXTRA)
    groups = [
        ("topic", topics, held_topics, TRAIN_TOPIC_TEMPLATES, HELD_OUT_TOPIC_TEMPLATES),
        ("code", CODE_TASKS, set(HELD_OUT_CODE_TASKS), TRAIN_CODE_TEMPLATES,
         HELD_OUT_CODE_TEMPLATES),
        ("compare", PAIRS, set(HELD_OUT_PAIRS), TRAIN_PAIR_TEMPLATES, HELD_OUT_PAIR_TEMPLATES),
        ("tips", ACTIVITIES, set(HELD_OUT_ACTIVITIES), TRAIN_ACTIVITY_TEMPLATES,
         HELD_OUT_ACTIVITY_TEMPLATES),
    ]  # fmt: skip
    for name, items, held_items, train_t, held_t in groups:
        for x in [*items, *sorted(h for h in held_items if h not in items)]:
            if x in held_items:
                for t in held_t:
                    add(held, name, t, x)
            else:
                for t in train_t:
                    add(train, name, t, x)
    for q in QUESTIONS:
        add(train, "question", "{x}", q)
    for q in HELD_OUT_QUESTIONS:
        add(held, "question", "{x}", q)

    funcs: list[tuple[str, str]] = []
    docs: list[tuple[str, str]] = []
    for module, kind, body in stdlib_items():
        (funcs if kind == "func" else docs).append((module, body))
    is_held_module = {m: stable_bucket(m.split(".")[0], 12) == 0 for m, _ in funcs + docs}
    rng.shuffle(funcs)
    rng.shuffle(docs)
    for i, (module, body) in enumerate(funcs[:4000]):
        if is_held_module[module]:
            add(held, "stdlib-func", HELD_OUT_FUNC_TEMPLATES[0], body)
        else:
            add(train, "stdlib-func", TRAIN_FUNC_TEMPLATES[i % len(TRAIN_FUNC_TEMPLATES)], body)
    for i, (module, body) in enumerate(docs):
        body = clip(body)
        if is_held_module[module]:
            if i < 3000:
                add(held, "stdlib-doc", HELD_OUT_DOC_TEMPLATES[0], body)
            continue
        if i < 4000:
            template = TRAIN_DOC_TEMPLATES[i % len(TRAIN_DOC_TEMPLATES)]
            add(train, "stdlib-doc", template, body.split("\n\n")[0] if "function" in template else body)
        elif i < 6000:
            text.append({"source": "stdlib-doc", "text": body})
    for i, (name, body) in enumerate(pydoc_topics().items()):
        body_clip = clip(body)
        if stable_bucket(name, 10) == 0:
            add(held, "pydoc", HELD_OUT_DOC_TEMPLATES[0], body_clip)
        else:
            add(train, "pydoc", TRAIN_DOC_TEMPLATES[i % 2], body_clip)
            text.extend({"source": "pydoc", "text": clip(body[j : j + 4000], 1800)} for j in range(0, len(body), 4000))

    for source, passages, held_books in (
        ("bible", list(bible_passages()), BIBLE_HELD_OUT),
        ("austen", list(austen_paragraphs()), AUSTEN_HELD_OUT),
    ):
        rng.shuffle(passages)
        n_train = 0
        for book, p in passages:
            p = clip(p, 900)
            if book in held_books:
                add(held, source, HELD_OUT_PASSAGE_TEMPLATES[n_train % 2], p)
            elif n_train < 2500:
                add(train, source, TRAIN_PASSAGE_TEMPLATES[n_train % len(TRAIN_PASSAGE_TEMPLATES)], p)
                n_train += 1
            elif n_train < 3500:
                text.append({"source": source, "text": p})
                n_train += 1

    text = pack_text(text)
    # Held-out sources are uneven in size; keep a balanced sample of each.
    by_source: dict[str, list[dict]] = {}
    for item in held:
        by_source.setdefault(item["source"], []).append(item)
    held = []
    for source in sorted(by_source):
        items = by_source[source]
        rng.shuffle(items)
        held.extend(items[:40])
    for split in (train, held, text):
        rng.shuffle(split)
    for i, item in enumerate(train):
        item["id"] = f"t{i}"
    for i, item in enumerate(held):
        item["id"] = f"h{i}"
    for i, item in enumerate(text):
        item["id"] = f"x{i}"
    return train, held, text


def pack_text(items: list[dict], size: int = 1500) -> list[dict]:
    """Join short passages of one source into chunks of about `size` characters (one prefill each)."""
    packed: list[dict] = []
    buf: dict[str, list[str]] = {}
    for item in items:
        parts = buf.setdefault(item["source"], [])
        parts.append(item["text"])
        if sum(len(p) for p in parts) >= size:
            packed.append({"source": item["source"], "text": "\n\n".join(parts)})
            parts.clear()
    packed.extend({"source": s, "text": "\n\n".join(p)} for s, p in buf.items() if p)
    return packed


def write_jsonl_gz(path: Path, items: list[dict]) -> None:
    # mtime=0 keeps the file byte-identical across runs with the same seed.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for item in items:
            f.write((json.dumps(item, ensure_ascii=False) + "\n").encode())


def read_jsonl_gz(path: str | Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.draft_prompts", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/draft"), help="directory for the .jsonl.gz splits")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    train, held, text = build(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, items in (("train", train), ("heldout", held), ("text", text)):
        path = args.out / f"{name}.jsonl.gz"
        write_jsonl_gz(path, items)
        sources: dict[str, int] = {}
        for item in items:
            sources[item["source"]] = sources.get(item["source"], 0) + 1
        print(
            f"{path}: {len(items)} items, {path.stat().st_size:,} bytes; "
            + ", ".join(f"{k} {v}" for k, v in sorted(sources.items()))
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
