// Builds the page the hub serves into presence_hub/static/ (shipped in the Python
// package, so that a pip install needs no Node); --check fails if what is shipped
// differs from what the sources build to.
import { readFileSync, writeFileSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const shipped = join(here, "..", "..", "..", "presence_hub", "static");
const result = await build({
  entryPoints: [join(here, "page.ts")],
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: true,
  legalComments: "none",
  write: false,
});
const files = {
  "page.js": Buffer.from(result.outputFiles[0].contents),
  "index.html": readFileSync(join(here, "index.html")),
};

if (process.argv.includes("--check")) {
  const stale = Object.entries(files).filter(([name, bytes]) => {
    try {
      return !readFileSync(join(shipped, name)).equals(bytes);
    } catch {
      return true;
    }
  });
  if (stale.length > 0) {
    console.error(`presence_hub/static/ differs from clients/js/page/: ${stale.map(([n]) => n).join(", ")}; run npm run build:page`);
    process.exit(1);
  }
  console.log("presence_hub/static/ is the build of clients/js/page/");
} else {
  mkdirSync(shipped, { recursive: true });
  for (const [name, bytes] of Object.entries(files)) {
    writeFileSync(join(shipped, name), bytes);
  }
  console.log(`built ${Object.keys(files).join(", ")} into presence_hub/static/`);
}
