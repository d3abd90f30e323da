"""The methods a comparison knows, their display names, and the paper's reported numbers."""

METHODS = ("warmup", "sft", "offline_st", "online_st", "reft")
METHOD_NAMES = {"warmup": "Warm-up", "sft": "SFT", "offline_st": "Offline-ST", "online_st": "Online-ST", "reft": "ReFT"}

# The paper's numbers (percent; top-1 / voting@100 / reranking@100), from ../shared/docs/reft-paper-notes.md.
# None: not quoted there. The last three rows are SFT -> ReFT pairs whose backbone the notes do not record.
PAPER_RESULTS = [
    {"dataset": "gsm8k", "style": "program", "model": "CodeLlama-7B", "warmup": [63.00, None, None],
     "sft": [63.68, 68.0, 77.0], "reft": [75.28, 78.0, 81.2]},
    {"dataset": "gsm8k", "style": "program", "model": "Galactica-6.7B", "warmup": [48.37, None, None],
     "sft": [58.83, 62.9, 73.4], "reft": [68.91, 71.9, 76.4]},
    {"dataset": "gsm8k", "style": "nl", "model": "(not recorded)", "sft": [43.59, None, None],
     "reft": [53.30, None, None]},
    {"dataset": "svamp", "style": "program", "model": "(not recorded)", "sft": [75.40, None, None],
     "reft": [79.19, None, None]},
    {"dataset": "mathqa", "style": "nl", "model": "(not recorded)", "sft": [56.01, None, None],
     "reft": [60.13, None, None]},
]
DATASET_OF = {"gsm8k": "gsm8k", "gsm8k_reft": "gsm8k", "svamp": "svamp", "mathqa": "mathqa"}
