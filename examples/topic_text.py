"""A small text-classification data set in plain English, written as CSV for `data.name: hf`.

    python examples/topic_text.py data/topics        # writes data/topics/train.csv and test.csv
    fedhpc run configs/minilm_topics.yaml            # MiniLM + LoRA learns it (README: figures)

Each sentence mentions three words of one of four topics (sports, cooking, money, music) inside a
neutral template; the label is the topic name. The test sentences use **topic words that no
training sentence contains**, so a model can only classify them by what the words mean: the
pretrained MiniLM knows that "tennis" is sport and "violin" is music, a randomly initialised one
does not (`model.random_init=true` builds that baseline; the README has both figures). Everything
is drawn from `numpy.random.default_rng(seed)`: the same seed writes the same files.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

TOPICS = {  # first 16 words: training sentences; last 8: test sentences only
    "sports": ["football", "goal", "team", "coach", "match", "player", "score", "league", "stadium", "referee",
               "basketball", "soccer", "championship", "athlete", "tournament", "season",
               "tennis", "golf", "hockey", "baseball", "boxing", "olympic", "racing", "cricket"],
    "cooking": ["recipe", "oven", "kitchen", "flour", "sugar", "butter", "bake", "chef", "soup", "salad",
                "pasta", "garlic", "onion", "dinner", "breakfast", "sauce",
                "bread", "cheese", "pizza", "chicken", "rice", "cake", "meat", "vegetables"],
    "money": ["bank", "loan", "interest", "market", "stock", "price", "investor", "profit", "tax", "debt",
              "budget", "salary", "credit", "economy", "dollar", "payment",
              "finance", "bonds", "inflation", "revenue", "shares", "cash", "mortgage", "wealth"],
    "music": ["song", "guitar", "band", "concert", "album", "singer", "piano", "melody", "drum", "rhythm",
              "orchestra", "lyrics", "jazz", "chorus", "opera", "tune",
              "violin", "rock", "symphony", "choir", "pop", "trumpet", "musician", "radio"],
}
TRAIN_WORDS = 16
TEMPLATES = [
    "my friend told me about the {} and the {} after the {}",
    "yesterday we talked about the {} , the {} and the {}",
    "the article was mostly about the {} and the {} , not the {}",
    "she could not stop thinking about the {} , the {} and the {}",
    "there was news about the {} , then the {} and later the {}",
    "everyone asked about the {} and the {} during the {}",
]


def sentences(count: int, *, test: bool, rng: np.random.Generator) -> list[tuple[str, str]]:
    rows = []
    names = sorted(TOPICS)
    for _ in range(count):
        topic = names[rng.integers(len(names))]
        words = TOPICS[topic][TRAIN_WORDS:] if test else TOPICS[topic][:TRAIN_WORDS]
        picked = rng.choice(words, size=3, replace=False)
        rows.append((TEMPLATES[rng.integers(len(TEMPLATES))].format(*picked), topic))
    return rows


def write(folder: str | Path, *, train: int = 800, test: int = 400, seed: int = 0) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, count in (("train", train), ("test", test)):
        with open(folder / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(sentences(count, test=name == "test", rng=rng))
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="data/topics")
    parser.add_argument("--train", type=int, default=800)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {write(args.folder, train=args.train, test=args.test, seed=args.seed)}/train.csv and test.csv")
