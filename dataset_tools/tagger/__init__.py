"""SmilingWolf WD taggers (v2 and v3) run through onnxruntime, per their model contract (docs/dataset-tools.md#tagger-model-contract)."""
