"""The guide's back-end, reproduced faithfully as the benchmarks' baseline. Not deployed.

What it does, as the guide's keras_flask.py does: Flask's development server,
full Keras/TensorFlow loaded, the upload written to a shared `output.png` and
read back, the whole canvas squashed to 28x28, `model.predict` per request.
"""
import argparse
import base64
import re

import numpy as np
from flask import Flask, request
from flask_cors import CORS
from PIL import Image

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--port", type=int, default=5000)
args = parser.parse_args()

import keras  # noqa: E402  (after argparse, as a script)

app = Flask(__name__)
CORS(app)
model = keras.models.load_model(args.model)


def convert_image(img_data):
    encoded = re.search(rb"base64,(.*)", img_data).group(1)
    with open("output.png", "wb") as output:
        output.write(base64.b64decode(encoded))


@app.route("/predict/", methods=["GET", "POST"])
def predict():
    convert_image(request.get_data())
    x = np.asarray(Image.open("output.png").convert("L"))
    x = np.invert(x)
    x = np.asarray(Image.fromarray(x).resize((28, 28)), dtype=np.float32) / 255.0
    out = model.predict(x.reshape(1, 28, 28, 1))
    return str(int(np.argmax(out, axis=1)[0]))


app.run(host="127.0.0.1", port=args.port)
