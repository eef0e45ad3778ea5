"""A user's own metrics, imported by path ("user_metric:word_overlap") in the tests."""


def word_overlap(predictions, examples):
    """Percent of each target's words that its prediction contains, averaged."""
    shares = []
    for prediction, example in zip(predictions, examples, strict=True):
        words = example["target"].split()
        shares.append(sum(w in prediction.split() for w in words) / len(words))
    return {"word_overlap": 100.0 * sum(shares) / len(shares)}


def out_of_range(predictions, examples):
    return {"score": 150.0}
