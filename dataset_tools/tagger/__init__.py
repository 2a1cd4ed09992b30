"""SmilingWolf WD taggers (v2 and v3) run through onnxruntime, per the model contract of the reference spec."""
