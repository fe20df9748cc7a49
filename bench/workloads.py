"""Fixed, generated workloads. Every text is distinct (never repeated within or across workloads), so prefix
caches cannot inflate a figure; the same seed gives every peer exactly the same texts."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

__all__ = ["QWEN3_QUERY_INSTRUCTION", "WORKLOADS", "TextMaker", "Workload", "as_sent", "card_query",
           "select_workloads"]

# Qwen3-Embedding's model card: the instruction of its web-search example, and how a query is formatted with it.
QWEN3_QUERY_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def card_query(instruction: str, text: str) -> str:
    """A query as the model card's `get_detailed_instruct` formats it client-side (for peers without
    an `instruction` field; our server formats the same string itself)."""
    return f"Instruct: {instruction}\nQuery:{text}"


def as_sent(requests: list[list[str]], instruction: str | None, server_formats: bool
            ) -> tuple[list[list[str]], str | None]:
    """(texts, `instruction` field) as a client sends them: our server takes the instruction as a field and
    formats it itself; to any other server the client sends the formatted query (the model card's way)."""
    if instruction is None or server_formats:
        return requests, instruction
    return [[card_query(instruction, text) for text in request] for request in requests], None


# Everyday English words, so that both WordPiece (MiniLM) and byte-level BPE give realistic token counts.
_WORDS = """
time year people way day man thing woman life child world school state family student group country problem
hand part place case week company system program question work government number night point home water room
mother area money story fact month lot right study book eye job word business issue side kind head house
service friend father power hour game line end member law car city community name president team minute idea
kid body information back parent face others level office door health person art war history party result
change morning reason research girl guy moment air teacher force education foot boy age policy process music
market sense nation plan college interest death experience effect class control care field development role
effort rate heart drug show leader light voice wife police mind price report decision son view relationship
town road arm difference value building action model season society tax director position player record
paper space ground form event official matter center couple site project activity star table need court oil
situation cost industry figure street image phone data picture practice piece land product doctor wall
patient worker news test movie north love support technology step baby computer type attention film tree
source organization hair window evidence population site bank describe explain retrieve embed search query
answer passage document vector server model measure fast small large quick bright green silent ancient
modern simple complex local global early late strong soft
""".split()  # noqa: SIM905 - a word list reads better as text

Tokenizer = Callable[[list[str]], list[int]]


@dataclass(frozen=True)
class Workload:
    """One measured case: `per_request` texts of `kind` per request, `concurrency` requests in flight."""

    name: str
    kind: str  # "short" (~15 tokens), "long" (~500 tokens), "mixed" (5..500 tokens, skewed short)
    per_request: int
    concurrency: int
    encoding: str = "float"
    mixed_batch: bool = False  # per-request count varies 1..per_request
    instruction: str | None = None  # one instruction shared by every (distinct) text: query traffic

    def describe(self) -> dict[str, object]:
        return asdict(self)


WORKLOADS: tuple[Workload, ...] = (
    Workload("short-c1", "short", 1, 1),
    Workload("short-c16", "short", 1, 16),
    Workload("short-c64", "short", 1, 64),
    Workload("short-c64-b64", "short", 1, 64, encoding="base64"),
    Workload("batch32", "short", 32, 2),
    Workload("batch32-b64", "short", 32, 2, encoding="base64"),
    Workload("long-b8", "long", 8, 2),
    Workload("mixed-c16", "mixed", 8, 16, mixed_batch=True),
    # Distinct short queries behind one shared instruction: what a prefix cache could reuse.
    Workload("query-c16", "short", 1, 16, instruction=QWEN3_QUERY_INSTRUCTION),
)


def select_workloads(names: Sequence[str] | None) -> list[Workload]:
    if not names:
        return list(WORKLOADS)
    by_name = {w.name: w for w in WORKLOADS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; choose from {sorted(by_name)}")
    return [by_name[n] for n in names]


class TextMaker:
    """Deterministic distinct texts of a target token length.

    Without a tokenizer a word counts as ~1.3 tokens; with one (`calibrate`) the words per text are scaled
    so the mean token count hits the target for that model.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.TARGETS = {"short": 15, "long": 500}
        self.words_per_token = {"short": 1 / 1.3, "long": 1 / 1.3}

    def calibrate(self, tokenize: Tokenizer) -> None:
        for kind, target in self.TARGETS.items():
            sample = self._texts(kind, 64, random.Random(12345), self.words_per_token[kind])
            mean = sum(tokenize(sample)) / len(sample)
            self.words_per_token[kind] *= target / max(mean, 1.0)

    def _texts(self, kind: str, count: int, rng: random.Random, words_per_token: float) -> list[str]:
        out = []
        for _ in range(count):
            target = self.TARGETS[kind]
            words = max(2, round(target * words_per_token * rng.uniform(0.85, 1.15)))
            # A leading serial makes every text distinct even if two word draws collide.
            out.append(f"{rng.randrange(10**9)} " + " ".join(rng.choice(_WORDS) for _ in range(words - 1)))
        return out

    def requests(self, workload: Workload, count: int, salt: int = 0) -> list[list[str]]:
        """`count` requests' worth of texts for `workload`; `salt` separates repetitions and warm-up."""
        rng = random.Random(f"{self.seed}/{workload.name}/{salt}")
        out: list[list[str]] = []
        for _ in range(count):
            n = rng.randint(1, workload.per_request) if workload.mixed_batch else workload.per_request
            if workload.kind == "mixed":
                texts = []
                for _ in range(n):
                    # Skewed towards short, as real query/document traffic is: 70% short, 30% up to 500.
                    if rng.random() < 0.7:
                        texts += self._texts("short", 1, rng, self.words_per_token["short"])
                    else:
                        scale = rng.uniform(0.05, 1.0)
                        texts += [" ".join(self._texts("long", 1, rng, self.words_per_token["long"] * scale))]
                out.append(texts)
            else:
                out.append(self._texts(workload.kind, n, rng, self.words_per_token[workload.kind]))
        return out
