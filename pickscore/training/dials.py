"""The synthetic data's dials, as data: the parsers of ``pickscore data synthetic`` read them without loading the
drawing code (Pillow, pyarrow)."""

HELD_OUT_FRACTION = 0.1  # of pairs, for each of validation and test (default)
# Fake generators, best first, for 1 to 5 models: the name says the rank. Each image changes every attribute of
# its prompt's scene independently with the generator's probability, spaced from BEST_CHANGE to WORST_CHANGE.
GENERATOR_NAMES = {
    1: ("good",),
    2: ("good", "poor"),
    3: ("good", "fair", "poor"),
    4: ("excellent", "good", "fair", "poor"),
    5: ("excellent", "good", "fair", "poor", "bad"),
}
BEST_CHANGE, WORST_CHANGE = 0.05, 0.65
MAX_MODEL_PROMPTS = 1000  # distinct captions drawn from the ~2,600 the scenes can say
