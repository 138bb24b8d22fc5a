// Embed images with an exported crossmetric folder in Node, through transformers.js, and print the embeddings as JSON.
//
//   node scripts/transformers_js_check.mjs MODEL_DIR [--dtype fp32|q8] [--pixel-values] IMAGE [IMAGE ...]
//
// --pixel-values prints the folder's preprocessing of each image (the processor's pixel_values, flattened) instead
// of embeddings: the resize is where the two libraries can differ, so tests compare it with Python's directly.
//
// transformers.js resolves a model id against env.localModelPath; remote models are switched off, so only the
// exported folder (config.json, preprocessor_config.json, onnx/model.onnx or onnx/model_quantized.onnx) is read.
// Install once: (cd scripts/transformers_js && npm install). scripts/transformers_js_check.py compares with Python.
import path from "node:path";
import { createRequire } from "node:module";

const require = createRequire(path.join(import.meta.dirname, "transformers_js", "package.json"));
const { AutoImageProcessor, RawImage, env, pipeline } = await import(require.resolve("@huggingface/transformers"));

const args = process.argv.slice(2);
const pixelValuesAt = args.indexOf("--pixel-values");
if (pixelValuesAt >= 0) args.splice(pixelValuesAt, 1);
let dtype = "fp32";
const dtypeAt = args.indexOf("--dtype");
if (dtypeAt >= 0) {
  dtype = args[dtypeAt + 1];
  args.splice(dtypeAt, 2);
}
if (args.length < 2) {
  console.error("usage: node transformers_js_check.mjs MODEL_DIR [--dtype fp32|q8] [--pixel-values] IMAGE [IMAGE ...]");
  process.exit(2);
}
const [modelDir, ...images] = args;
const folder = path.resolve(modelDir);
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(folder) + path.sep;

// No process.exit() after printing: it would cut a long output written to a pipe.
if (pixelValuesAt >= 0) {
  const processor = await AutoImageProcessor.from_pretrained(path.basename(folder));
  const pixelValues = [];
  for (const image of images) {
    const { pixel_values } = await processor(await RawImage.read(path.resolve(image)));
    pixelValues.push(Array.from(pixel_values.data));
  }
  console.log(JSON.stringify({ transformers_js: env.version, pixel_values: pixelValues }));
} else {
  const extractor = await pipeline("image-feature-extraction", path.basename(folder), { dtype });
  const embeddings = [];
  for (const image of images) {
    const output = await extractor(path.resolve(image), { pool: true });
    embeddings.push(Array.from(output.data));
  }
  console.log(JSON.stringify({ dtype, transformers_js: env.version, embeddings }));
}
