"""The server a user writes in ~40 lines: FastAPI + uvicorn + onnxruntime, batch 1, no batching.

What bench/serving/peers.py measures extendserve against. Run: MODEL=plain/model.onnx uvicorn
handwritten:app --workers 2 (each worker one onnxruntime thread: 2 in all).
"""

import io
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, UploadFile
from PIL import Image

opts = ort.SessionOptions()
opts.intra_op_num_threads = int(os.environ.get("THREADS", "1"))
session = ort.InferenceSession(os.environ["MODEL"], opts, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
app = FastAPI()


def pixels(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    s = 256 / min(w, h)
    im = im.resize((max(256, round(w * s)), max(256, round(h * s))), Image.Resampling.BILINEAR)
    w, h = im.size
    left, top = (w - 224) // 2, (h - 224) // 2
    return np.asarray(im.crop((left, top, left + 224, top + 224)), np.uint8)[None]


@app.post("/classify")
def classify(image: UploadFile = File(...)) -> dict:
    scores = session.run(None, {name: pixels(image.file.read())})[0][0]
    top = int(np.argmax(scores))
    return {"index": top, "score": float(scores[top])}
