"""Show a fine-tuned run's predictions on new sentences with `transformers.pipeline`.

Usage: python examples/predict_sentiment.py RUN_DIR/final FILE_WITH_ONE_TEXT_PER_LINE

This is the point of `final/`: a plain Hugging Face model folder, nothing of ours needed.
"""

import sys

from transformers import pipeline


def main(model_dir: str, texts_file: str) -> None:
    """Print label and confidence for every line of `texts_file`."""
    with open(texts_file, encoding="utf-8") as handle:
        texts = [line.strip() for line in handle if line.strip()]
    classify = pipeline("text-classification", model=model_dir, device="cpu")
    for text, prediction in zip(texts, classify(texts), strict=True):
        print(f"{prediction['label']:>10} {prediction['score']:6.1%}  {text}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
