"""Ray Serve as its docs recommend for a model: 2 replicas, @serve.batch, a FastAPI ingress.

What bench/serving/peers.py measures extendserve against (ray[serve] is a benchmark dependency, in
its own virtual environment, never the project's). Run: MODEL=plain/model.onnx PORT=8000 python ray_app.py
"""

import io
import os
import time

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from ray import serve

app = FastAPI()


def pixels(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    s = 256 / min(w, h)
    im = im.resize((max(256, round(w * s)), max(256, round(h * s))), Image.Resampling.BILINEAR)
    w, h = im.size
    left, top = (w - 224) // 2, (h - 224) // 2
    return np.asarray(im.crop((left, top, left + 224, top + 224)), np.uint8)


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 1})
@serve.ingress(app)
class Classifier:
    def __init__(self) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(os.environ["MODEL"], opts, providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.004)
    async def run(self, batch: list[np.ndarray]) -> list[dict]:
        scores = self.session.run(None, {self.name: np.stack(batch)})[0]
        return [{"index": int(np.argmax(s)), "score": float(np.max(s))} for s in scores]

    @app.post("/classify")
    async def classify(self, image: UploadFile = File(...)) -> dict:
        return await self.run(pixels(await image.read()))


if __name__ == "__main__":
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": int(os.environ.get("PORT", "8000"))})
    serve.run(Classifier.bind(), route_prefix="/")
    print("ready", flush=True)
    while True:
        time.sleep(3600)
