"""The evaluation plane: scores (accuracy, ROUGE-L, BLEU-4, ingredient F1, step agreement, content)
and `ddft eval` (base vs DDFT vs joint adapters, matched and mismatched inputs)."""
