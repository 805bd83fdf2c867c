// Copies what the dashboard ships from node_modules into service/static/vendor, with the
// licences of everything bundled in it (model-viewer bundles three.js and lit).
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const modules = join(here, "node_modules");
const out = join(here, "..", "service", "static", "vendor");
mkdirSync(out, { recursive: true });

const viewer = join(modules, "@google", "model-viewer");
copyFileSync(join(viewer, "dist", "model-viewer.min.js"), join(out, "model-viewer.min.js"));

const versions = {};
const licences = [];
for (const name of ["@google/model-viewer", "three", "lit", "lit-html", "lit-element", "@lit/reactive-element", "@monogrid/gainmap-js"]) {
  const folder = join(modules, ...name.split("/"));
  const pkg = JSON.parse(readFileSync(join(folder, "package.json"), "utf8"));
  versions[name] = pkg.version;
  let text = "";
  for (const file of ["LICENSE", "LICENSE.md", "LICENSE.txt"]) {
    try { text = readFileSync(join(folder, file), "utf8"); break; } catch {}
  }
  licences.push(`${name} ${pkg.version} (${pkg.license})\n${"=".repeat(72)}\n${text.trim()}\n`);
}
writeFileSync(join(out, "LICENSES.txt"), licences.join("\n\n"));
writeFileSync(join(out, "versions.json"), JSON.stringify(versions, null, 2) + "\n");
console.log("vendor:", versions);
