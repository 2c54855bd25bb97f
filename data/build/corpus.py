"""Build the bundled mixed-domain seed corpus (`data/seed/seed.parquet`).

Why: no model or data hub is reachable here or in CI, so the project ships a small
corpus made only from text a fresh Debian machine obtains through its package
manager (Python and Linux documentation, Perl's manual, fortunes), the Python
standard library's own source, and seeded generators for math word problems and
instruction dialogues.  Every document is labelled with its domain and source.

Rebuild (needs `apt-get` and about a minute)::

    python data/build/corpus.py --out data/seed/seed.parquet
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import random
import re
import subprocess
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

DEBIAN_PACKAGES = ("python3.11-doc", "linux-doc-6.1", "perl-doc", "fortunes", "fortunes-min")
# Approximate character budgets per domain, so that no domain drowns the others.
BUDGET = {"prose": 5_000_000, "code": 3_200_000, "math": 1_600_000, "dialogue": 1_600_000}
HELDOUT_FRACTION = 0.05


@dataclass(slots=True)
class Doc:
    text: str
    domain: str
    source: str


def _split_for(text: str) -> str:
    """Deterministic held-out split by content hash (stable across rebuilds)."""
    h = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)
    return "heldout" if h % 1000 < HELDOUT_FRACTION * 1000 else "train"


def fetch_debian(workdir: Path) -> Path:
    """Download and unpack (without installing) the documentation packages."""
    debs = workdir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", *DEBIAN_PACKAGES], cwd=debs, check=True, stdout=subprocess.DEVNULL)
    root = workdir / "root"
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


_RST_NOISE = re.compile(r"^\s*(\.\. |:[a-z]+:|={3,}|-{3,}|~{3,}|\*{3,}|\^{3,}|#{3,})")


def _paragraphs(text: str) -> list[str]:
    paras = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.rstrip() for ln in block.splitlines() if not _RST_NOISE.match(ln)]
        para = " ".join(ln.strip() for ln in lines if ln.strip())
        if len(para) < 80:
            continue
        letters = sum(c.isalpha() or c == " " for c in para) / len(para)
        if letters > 0.85:
            paras.append(para)
    return paras


def _chunk(paras: list[str], lo: int = 400, hi: int = 2400) -> list[str]:
    """Group consecutive paragraphs into documents of lo..hi characters."""
    docs, cur = [], []
    for p in paras:
        cur.append(p)
        if sum(map(len, cur)) >= lo:
            docs.append("\n\n".join(cur)[:hi])
            cur = []
    return docs


def prose_docs(root: Path) -> list[Doc]:
    out: list[Doc] = []
    py = root / "usr/share/doc/python3.11/html/_sources"
    for f in sorted(py.rglob("*.rst.txt")):
        for d in _chunk(_paragraphs(f.read_text(errors="ignore"))):
            out.append(Doc(d, "prose", f"python-doc:{f.relative_to(py)}"))
    lx = root / "usr/share/doc/linux-doc-6.1/html/_sources"
    for f in sorted(lx.rglob("*.rst.txt")):
        for d in _chunk(_paragraphs(f.read_text(errors="ignore"))):
            out.append(Doc(d, "prose", f"linux-doc:{f.relative_to(lx)}"))
    for f in sorted(root.rglob("*.pod")):
        text = re.sub(r"[A-Z]<([^<>]*)>", r"\1", f.read_text(errors="ignore"))
        text = "\n".join(ln for ln in text.splitlines() if not ln.startswith("="))
        for d in _chunk(_paragraphs(text)):
            out.append(Doc(d, "prose", f"perl-doc:{f.name}"))
    fort = root / "usr/share/games/fortunes"
    for f in sorted(fort.glob("*")):
        if f.suffix or f.is_dir() or "off" in f.parts:
            continue
        items = [t.strip() for t in f.read_text(errors="ignore").split("\n%\n") if len(t.strip()) > 60]
        for i in range(0, len(items), 6):
            out.append(Doc("\n\n".join(items[i : i + 6]), "prose", f"fortunes:{f.name}"))
    return out


def code_docs() -> list[Doc]:
    """Top-level functions and classes of the standard library, one per document."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out: list[Doc] = []
    for f in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if any(p in f.parts for p in ("test", "tests", "idlelib", "site-packages", "lib2to3")):
            continue
        src = f.read_text(errors="ignore")
        starts = [m.start() for m in re.finditer(r"^(def |class |async def )", src, re.M)]
        for a, b in zip(starts, starts[1:] + [len(src)]):
            chunk = src[a:b].rstrip()
            if 200 <= len(chunk) <= 4000:
                out.append(Doc(chunk, "code", f"stdlib:{f.relative_to(stdlib)}"))
    return out


_NAMES = [
    "Ava",
    "Ben",
    "Chloe",
    "Dmitri",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jamal",
    "Kofi",
    "Lena",
    "Mateo",
    "Nora",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
]
_ITEMS = [
    ("apples", "crates"),
    ("pencils", "boxes"),
    ("books", "shelves"),
    ("eggs", "cartons"),
    ("marbles", "bags"),
    ("stamps", "albums"),
    ("cookies", "tins"),
    ("bolts", "bins"),
]


def _math_problem(rng: random.Random) -> str:
    kind = rng.randrange(6)
    n = rng.choice(_NAMES)
    item, cont = rng.choice(_ITEMS)
    if kind == 0:
        a, b, c = rng.randint(2, 20), rng.randint(3, 40), rng.randint(1, 30)
        total = a * b - c
        return (
            f"Problem: {n} has {a} {cont} with {b} {item} in each. {n} gives away {c} {item}. "
            f"How many {item} are left?\nSolution: {n} starts with {a} x {b} = {a * b} {item}. "
            f"After giving away {c}, {a * b} - {c} = {total}.\nAnswer: {total}"
        )
    if kind == 1:
        price, qty, paid = rng.randint(2, 15), rng.randint(2, 9), 0
        paid = (price * qty // 10 + 1) * 10
        return (
            f"Problem: A notebook costs ${price}. {n} buys {qty} notebooks and pays with ${paid}. "
            f"How much change does {n} get?\nSolution: The cost is {qty} x {price} = {price * qty} dollars. "
            f"The change is {paid} - {price * qty} = {paid - price * qty}.\nAnswer: {paid - price * qty}"
        )
    if kind == 2:
        x = rng.randint(-12, 12)
        a, b = rng.randint(2, 9), rng.randint(-20, 20)
        c = a * x + b
        sign = "+" if b >= 0 else "-"
        return (
            f"Problem: Solve for x: {a}x {sign} {abs(b)} = {c}.\nSolution: Subtract {b} from both sides: "
            f"{a}x = {c - b}. Divide by {a}: x = {x}.\nAnswer: x = {x}"
        )
    if kind == 3:
        speed, hours = rng.randint(30, 90), rng.randint(2, 7)
        return (
            f"Problem: A train travels at {speed} km per hour for {hours} hours. How far does it go?\n"
            f"Solution: Distance equals speed times time: {speed} x {hours} = {speed * hours}.\n"
            f"Answer: {speed * hours} km"
        )
    if kind == 4:
        w, h = rng.randint(3, 25), rng.randint(3, 25)
        return (
            f"Problem: A rectangle is {w} cm wide and {h} cm tall. What are its area and perimeter?\n"
            f"Solution: Area = {w} x {h} = {w * h} square cm. Perimeter = 2 x ({w} + {h}) = "
            f"{2 * (w + h)} cm.\nAnswer: area {w * h}, perimeter {2 * (w + h)}"
        )
    p, total = rng.choice([10, 20, 25, 40, 50, 75]), rng.randint(2, 40) * 20
    return (
        f"Problem: {p}% of the {total} students in a school walk to class. How many students walk?\n"
        f"Solution: {p}% of {total} is {p} / 100 x {total} = {p * total // 100}.\nAnswer: {p * total // 100}"
    )


def math_docs(n_chars: int, seed: int = 0) -> list[Doc]:
    rng = random.Random(seed)
    out, used = [], 0
    while used < n_chars:
        text = "\n\n".join(_math_problem(rng) for _ in range(rng.randint(2, 5)))
        out.append(Doc(text, "math", "generated:word-problems"))
        used += len(text)
    return out


_USER = [
    "What does {q} do?",
    "Can you explain {q}?",
    "How do I use {q} in Python?",
    "I keep seeing {q} in code. What is it for?",
    "Briefly, what is the purpose of {q}?",
]
_OPEN = ["Sure.", "Of course.", "Good question.", "Here is a short answer.", "Happy to help."]


def faq_docs(root: Path) -> list[Doc]:
    """The Python FAQ is real question/answer text: one question and its answer per document."""
    out: list[Doc] = []
    faq = root / "usr/share/doc/python3.11/html/_sources/faq"
    for f in sorted(faq.glob("*.rst.txt")):
        parts = re.split(r"^(.+\?)\n[-=~^]{3,}\n", f.read_text(errors="ignore"), flags=re.M)
        for q, body in zip(parts[1::2], parts[2::2]):
            answer = "\n\n".join(_paragraphs(body))[:2000]
            if len(answer) > 80:
                out.append(Doc(f"User: {q.strip()}\nAssistant: {answer}", "dialogue", f"python-faq:{f.name}"))
    return out


def dialogue_docs(n_chars: int, seed: int = 0) -> list[Doc]:
    """Instruction/dialogue-shaped text: questions about stdlib callables answered
    from their real docstrings, plus short chit-chat turns."""
    import importlib

    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = []
    for mod_name in [
        "os",
        "os.path",
        "re",
        "json",
        "math",
        "random",
        "itertools",
        "functools",
        "collections",
        "string",
        "textwrap",
        "shutil",
        "pathlib",
        "datetime",
        "statistics",
        "heapq",
        "bisect",
        "csv",
        "hashlib",
        "base64",
        "subprocess",
        "logging",
        "argparse",
        "time",
        "calendar",
        "fractions",
        "decimal",
        "difflib",
        "glob",
        "fnmatch",
        "zipfile",
        "gzip",
        "tarfile",
        "sqlite3",
        "urllib.parse",
        "html",
        "uuid",
        "copy",
        "pprint",
        "operator",
        "contextlib",
        "threading",
        "queue",
        "socket",
        "struct",
        "array",
        "enum",
        "dataclasses",
        "typing",
        "inspect",
        "unittest",
        "doctest",
        "tempfile",
        "io",
        "sys",
    ]:
        try:
            mod = importlib.import_module(mod_name)
        except Exception:
            continue
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not callable(obj):
                continue
            doc = inspect.getdoc(obj) or ""
            first = doc.split("\n\n")[0].replace("\n", " ").strip()
            if 40 <= len(first) <= 600 and first[0].isupper():
                pairs.append((f"{mod_name}.{name}", first))
            if inspect.isclass(obj):
                for mname, meth in sorted(vars(obj).items()):
                    mdoc = (inspect.getdoc(meth) or "") if not mname.startswith("_") else ""
                    mfirst = mdoc.split("\n\n")[0].replace("\n", " ").strip()
                    if 40 <= len(mfirst) <= 600 and mfirst[0].isupper():
                        pairs.append((f"{mod_name}.{name}.{mname}", mfirst))
    rng.shuffle(pairs)
    out, used, i = [], 0, 0
    while used < n_chars and i < len(pairs):
        turns = []
        for _ in range(rng.randint(1, 3)):
            if i >= len(pairs):
                break
            q, a = pairs[i]
            i += 1
            turns.append(f"User: {rng.choice(_USER).format(q='`' + q + '`')}\nAssistant: {rng.choice(_OPEN)} {a}")
        text = "\n".join(turns)
        out.append(Doc(text, "dialogue", "generated:stdlib-docstring-qa"))
        used += len(text)
    return out


def _take(docs: list[Doc], budget: int, rng: random.Random) -> list[Doc]:
    docs = docs[:]
    rng.shuffle(docs)
    out, used = [], 0
    for d in docs:
        if used >= budget:
            break
        out.append(d)
        used += len(d.text)
    return out


def build(out: Path, workdir: Path | None = None, seed: int = 0) -> pd.DataFrame:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = fetch_debian(Path(workdir or tmp))
        docs = (
            _take(prose_docs(root), BUDGET["prose"], rng)
            + _take(code_docs(), BUDGET["code"], rng)
            + math_docs(BUDGET["math"], seed)
            + faq_docs(root)
            + dialogue_docs(BUDGET["dialogue"], seed)
        )
    seen, rows = set(), []
    for d in docs:
        if d.text in seen:
            continue
        seen.add(d.text)
        rows.append({"text": d.text, "domain": d.domain, "source": d.source, "split": _split_for(d.text)})
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    df.insert(0, "doc_id", [f"seed-{i:06d}" for i in range(len(df))])
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out, index=False, compression="zstd")
    return df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/seed/seed.parquet"))
    ap.add_argument("--workdir", type=Path, default=None, help="keep downloaded packages here")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    df = build(a.out, a.workdir, a.seed)
    print(df.groupby(["domain", "split"]).agg(docs=("text", "size"), chars=("text", lambda s: s.str.len().sum())))


if __name__ == "__main__":
    main()
