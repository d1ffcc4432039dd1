#!/usr/bin/env node
// Validates Kubernetes manifests offline against the Kubernetes API schema.
//
//   node tests/k8s/validate.mjs FILE... | -        (- reads standard input)
//   node tests/k8s/validate.mjs --installed        (exit 0 if node_modules matches package-lock.json)
//
// Each YAML document is checked twice, both from the pinned kubernetes-models
// package (generated from the Kubernetes OpenAPI schema; see package.json):
//
// 1. the model's own validate(): ajv over the OpenAPI schema of its
//    apiVersion/kind (types, required fields, enums, formats);
// 2. a strict unknown-field check, which validate() does not do (the schemas
//    allow additional properties, so `imagePullPolcy: Always` would pass, and
//    the API server would drop it with a mere warning). The properties of each
//    type come from the package's .d.ts declarations of the same types:
//    every object is walked recursively; maps ({ [key: string]: T }) check
//    their values against T; unions descend only into the one branch that
//    fits the value's shape (IntOrString, Quantity: scalars, nothing to walk);
//    free-form types (RawExtension, JSON: empty interfaces) are not entered.
//
// Every problem is printed as `FILE: KIND/NAME: PATH: MESSAGE`; the exit
// status is 1 if there was any, 2 on a usage error.
//
// YAML is read as YAML 1.1, as kubectl reads it (e.g. `defaultMode: 0440` is
// octal). Secret.data and ConfigMap.binaryData values are base64 with line
// breaks ignored, as the API server decodes them (kustomize folds long values).

import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const NODE_MODULES = path.join(HERE, "node_modules");
const MODELS = path.join(NODE_MODULES, "kubernetes-models");

// ---------------------------------------------------------------------------
// --installed: does node_modules hold exactly what package-lock.json pins?
// ---------------------------------------------------------------------------

function installedMatchesLock() {
  let lock;
  try {
    lock = JSON.parse(fs.readFileSync(path.join(HERE, "package-lock.json"), "utf8"));
  } catch (e) {
    console.error(`validate.mjs: cannot read package-lock.json: ${e.message}`);
    return false;
  }
  for (const [where, meta] of Object.entries(lock.packages || {})) {
    if (where === "" || meta.link) continue;
    const pj = path.join(HERE, where, "package.json");
    let got;
    try {
      got = JSON.parse(fs.readFileSync(pj, "utf8")).version;
    } catch {
      if (meta.optional) continue;
      console.error(`validate.mjs: ${where} is not installed`);
      return false;
    }
    if (got !== meta.version) {
      console.error(`validate.mjs: ${where} is ${got}, package-lock.json pins ${meta.version}`);
      return false;
    }
  }
  return true;
}

// ---------------------------------------------------------------------------
// A reader for the subset of TypeScript declarations kubernetes-models emits
// ---------------------------------------------------------------------------

function tokenize(src, file) {
  const toks = [];
  let i = 0;
  const n = src.length;
  while (i < n) {
    const c = src[i];
    if (c === " " || c === "\t" || c === "\n" || c === "\r") { i++; continue; }
    if (src.startsWith("/*", i)) {
      const end = src.indexOf("*/", i + 2);
      if (end < 0) throw new Error(`${file}: unterminated comment`);
      i = end + 2;
      continue;
    }
    if (src.startsWith("//", i)) {
      const end = src.indexOf("\n", i);
      i = end < 0 ? n : end + 1;
      continue;
    }
    if (c === '"' || c === "'") {
      let j = i + 1;
      let s = "";
      while (j < n && src[j] !== c) {
        if (src[j] === "\\") { s += src[j + 1]; j += 2; } else { s += src[j]; j++; }
      }
      toks.push({ t: "str", v: s });
      i = j + 1;
      continue;
    }
    const id = /^[A-Za-z_$][\w$]*/.exec(src.slice(i, i + 200));
    if (id) { toks.push({ t: "id", v: id[0] }); i += id[0].length; continue; }
    const num = /^-?\d+(\.\d+)?/.exec(src.slice(i, i + 50));
    if (num) { toks.push({ t: "num", v: Number(num[0]) }); i += num[0].length; continue; }
    if (src.startsWith("=>", i)) { toks.push({ t: "p", v: "=>" }); i += 2; continue; }
    toks.push({ t: "p", v: c });
    i++;
  }
  return toks;
}

class DeclParser {
  constructor(toks, file) {
    this.toks = toks;
    this.i = 0;
    this.file = file;
  }
  peek(k = 0) { return this.toks[this.i + k]; }
  is(v, k = 0) { const t = this.peek(k); return t !== undefined && (t.t === "p" || t.t === "id") && t.v === v; }
  next() { return this.toks[this.i++]; }
  expect(v) {
    const t = this.next();
    if (!t || t.v !== v) throw new Error(`${this.file}: expected ${v}, got ${t ? t.v : "end of file"}`);
    return t;
  }
  // Skips one statement we do not need, balancing brackets, up to its ';'.
  skipStatement() {
    let depth = 0;
    while (this.i < this.toks.length) {
      const t = this.next();
      if (t.t !== "p") continue;
      if ("{([<".includes(t.v)) depth++;
      else if ("})]>".includes(t.v)) {
        depth--;
        if (depth === 0 && t.v === "}" && !this.is(";") && !this.is("|") && !this.is("[")) return;
      } else if (t.v === ";" && depth === 0) return;
    }
  }
  // A file: imports, interfaces, type aliases, re-exports; the rest skipped.
  parseFile() {
    const mod = { imports: new Map(), decls: new Map(), exports: new Map(), reexports: new Map() };
    while (this.i < this.toks.length) {
      if (this.is("import")) { this.parseImport(mod); continue; }
      let exported = false;
      if (this.is("export")) { this.next(); exported = true; }
      if (this.is("declare")) this.next();
      if (this.is("interface")) { this.parseInterface(mod, exported); continue; }
      if (this.is("type") && this.peek(1) && this.peek(1).t === "id") { this.parseTypeAlias(mod, exported); continue; }
      if (exported && (this.is("{") || (this.is("type") && this.is("{", 1)))) { this.parseExportList(mod); continue; }
      this.skipStatement();
    }
    return mod;
  }
  parseNameList() { // { a, type b, c as d } -> [[a, a], [b, b], [c, d]]
    const out = [];
    this.expect("{");
    while (!this.is("}")) {
      if (this.is("type") && this.peek(1).t === "id" && !this.is(",", 1) && !this.is("}", 1) && !this.is("as", 1)) this.next();
      const name = this.next().v;
      let alias = name;
      if (this.is("as")) { this.next(); alias = this.next().v; }
      out.push([name, alias]);
      if (this.is(",")) this.next();
    }
    this.expect("}");
    return out;
  }
  parseImport(mod) {
    this.expect("import");
    if (this.is("type")) this.next();
    if (!this.is("{")) { this.skipStatement(); return; }
    const names = this.parseNameList();
    this.expect("from");
    const spec = this.next().v;
    if (this.is(";")) this.next();
    for (const [name, alias] of names) mod.imports.set(alias, { spec, name });
  }
  parseExportList(mod) {
    if (this.is("type")) this.next();
    const names = this.parseNameList();
    if (this.is("from")) {
      this.next();
      const spec = this.next().v;
      for (const [name, alias] of names) mod.reexports.set(alias, { spec, name });
    } else {
      for (const [name, alias] of names) mod.exports.set(alias, name);
    }
    if (this.is(";")) this.next();
  }
  parseInterface(mod, exported) {
    this.expect("interface");
    const name = this.next().v;
    if (this.is("<")) this.skipAngles();
    const bases = [];
    if (this.is("extends")) {
      this.next();
      for (;;) {
        bases.push(this.next().v);
        if (this.is("<")) this.skipAngles();
        if (!this.is(",")) break;
        this.next();
      }
    }
    const body = this.parseObjectType();
    mod.decls.set(name, { kind: "interface", bases, type: body });
    if (exported) mod.exports.set(name, name);
  }
  parseTypeAlias(mod, exported) {
    this.expect("type");
    const name = this.next().v;
    if (this.is("<")) this.skipAngles();
    this.expect("=");
    const start = this.i;
    let type;
    try {
      type = this.parseType();
      if (!this.is(";")) throw new Error("not a plain type");
      this.next();
    } catch {
      // Conditional or function types (in @kubernetes-models/base): not data.
      this.i = start;
      this.skipStatement();
      type = { k: "free" };
    }
    mod.decls.set(name, { kind: "alias", type });
    if (exported) mod.exports.set(name, name);
  }
  skipAngles() {
    let depth = 0;
    do {
      const t = this.next();
      if (t.v === "<") depth++;
      else if (t.v === ">") depth--;
    } while (depth > 0);
  }
  parseType() {
    if (this.is("|")) this.next();
    const branches = [this.parsePostfix()];
    while (this.is("|")) { this.next(); branches.push(this.parsePostfix()); }
    return branches.length === 1 ? branches[0] : { k: "union", of: branches };
  }
  parsePostfix() {
    let t = this.parsePrimary();
    while (this.is("[")) {
      this.next();
      if (this.is("]")) { this.next(); t = { k: "array", of: t }; continue; }
      this.parseType(); // indexed access, e.g. IDeployment["kind"]: a literal we need not walk
      this.expect("]");
      t = { k: "free" };
    }
    return t;
  }
  parsePrimary() {
    const t = this.next();
    if (!t) throw new Error(`${this.file}: unexpected end of file in a type`);
    if (t.t === "str" || t.t === "num") return { k: "scalar" };
    if (t.t === "p" && t.v === "(") { const inner = this.parseType(); this.expect(")"); return inner; }
    if (t.t === "p" && t.v === "{") { this.i--; return this.parseObjectType(); }
    if (t.t !== "id") throw new Error(`${this.file}: unexpected ${t.v} in a type`);
    if (["string", "number", "boolean", "true", "false", "null", "undefined", "bigint"].includes(t.v)) return { k: "scalar" };
    if (["any", "unknown", "object", "never", "void"].includes(t.v)) return { k: "free" };
    if ((t.v === "Array" || t.v === "ReadonlyArray") && this.is("<")) {
      this.next();
      const of = this.parseType();
      this.expect(">");
      return { k: "array", of };
    }
    if (t.v === "Record" && this.is("<")) {
      this.next();
      this.parseType();
      this.expect(",");
      const of = this.parseType();
      this.expect(">");
      return { k: "object", props: new Map(), index: of };
    }
    if (this.is("<")) return (this.skipAngles(), { k: "free" }); // generics we do not model
    return { k: "ref", name: t.v, file: this.file };
  }
  parseObjectType() {
    this.expect("{");
    const props = new Map();
    let index = null;
    while (!this.is("}")) {
      if (this.is("readonly") && !this.is(":", 1) && !this.is("?", 1)) this.next();
      if (this.is("[")) { // [key: string]: T
        this.next();
        this.next();
        this.expect(":");
        this.parseType();
        this.expect("]");
        if (this.is("?")) this.next();
        this.expect(":");
        index = this.parseType();
      } else {
        const key = this.next().v;
        if (this.is("?")) this.next();
        if (this.is("(")) { // a method signature: not data
          this.skipStatement();
          continue;
        }
        this.expect(":");
        props.set(String(key), this.parseType());
      }
      if (this.is(";") || this.is(",")) this.next();
    }
    this.expect("}");
    return { k: "object", props, index };
  }
}

// ---------------------------------------------------------------------------
// Resolving names across the package's declaration files
// ---------------------------------------------------------------------------

const modules = new Map();

function loadModule(file) {
  if (!modules.has(file)) {
    const src = fs.readFileSync(file, "utf8");
    modules.set(file, new DeclParser(tokenize(src, file), file).parseFile());
  }
  return modules.get(file);
}

function resolveSpec(spec, fromFile) {
  const candidates = [];
  if (spec.startsWith(".")) {
    const base = path.resolve(path.dirname(fromFile), spec).replace(/\.js$/, "");
    candidates.push(base + ".d.ts", path.join(base, "index.d.ts"));
  } else {
    const parts = spec.split("/");
    const pkgLen = spec.startsWith("@") ? 2 : 1;
    const pkgDir = path.join(NODE_MODULES, ...parts.slice(0, pkgLen));
    const sub = parts.slice(pkgLen).join("/").replace(/\.js$/, "");
    if (sub) {
      candidates.push(path.join(pkgDir, sub + ".d.ts"), path.join(pkgDir, sub, "index.d.ts"));
    } else {
      let types = "index.d.ts";
      try {
        const pj = JSON.parse(fs.readFileSync(path.join(pkgDir, "package.json"), "utf8"));
        const exp = pj.exports && (pj.exports["."] || pj.exports);
        types = (exp && exp.types) || pj.types || pj.typings || types;
      } catch { /* use index.d.ts */ }
      candidates.push(path.join(pkgDir, types));
    }
  }
  const hit = candidates.find((f) => fs.existsSync(f));
  if (!hit) throw new Error(`cannot resolve the declarations of ${spec} (from ${fromFile})`);
  return hit;
}

const resolved = new Map();

// The declaration behind NAME as seen from FILE: {kind, ...} or null.
function lookup(name, file, seen = new Set()) {
  const key = `${file}\0${name}`;
  if (seen.has(key)) return null;
  seen.add(key);
  const mod = loadModule(file);
  if (mod.decls.has(name)) return { file, decl: mod.decls.get(name) };
  if (mod.imports.has(name)) {
    const imp = mod.imports.get(name);
    return lookupExport(imp.name, resolveSpec(imp.spec, file), seen);
  }
  return null;
}

function lookupExport(name, file, seen) {
  const mod = loadModule(file);
  if (mod.exports.has(name)) return lookup(mod.exports.get(name), file, seen);
  if (mod.reexports.has(name)) {
    const re = mod.reexports.get(name);
    return lookupExport(re.name, resolveSpec(re.spec, file), seen);
  }
  if (mod.decls.has(name)) return { file, decl: mod.decls.get(name) };
  return null;
}

// A type with references replaced by what they name (one level): object types
// of interfaces get the properties of their bases merged in.
function deref(type) {
  if (type.k !== "ref") return type;
  const key = `${type.file}\0${type.name}`;
  if (resolved.has(key)) return resolved.get(key);
  const hit = lookup(type.name, type.file);
  if (!hit) throw new Error(`${type.file}: cannot resolve type ${type.name}`);
  let out;
  if (hit.decl.kind === "alias") {
    out = deref(withFile(hit.decl.type, hit.file));
  } else {
    const props = new Map();
    let index = hit.decl.type.index ? withFile(hit.decl.type.index, hit.file) : null;
    for (const base of hit.decl.bases) {
      const b = deref({ k: "ref", name: base, file: hit.file });
      if (b.k !== "object") continue;
      for (const [p, t] of b.props) props.set(p, t);
      index = index || b.index;
    }
    for (const [p, t] of hit.decl.type.props) props.set(p, withFile(t, hit.file));
    out = { k: "object", props, index };
  }
  resolved.set(key, out);
  return out;
}

function withFile(type, file) {
  switch (type.k) {
    case "ref": return type.file === file ? type : { ...type, file };
    case "array": return { k: "array", of: withFile(type.of, file) };
    case "union": return { k: "union", of: type.of.map((t) => withFile(t, file)) };
    default: return type;
  }
}

// ---------------------------------------------------------------------------
// The strict walk
// ---------------------------------------------------------------------------

function isPlainObject(v) {
  return v !== null && typeof v === "object" && !Array.isArray(v) && !(v instanceof Date);
}

function childPath(base, key) {
  if (typeof key === "number") return `${base}[${key}]`;
  if (/^[A-Za-z_$][\w$-]*$/.test(key)) return base ? `${base}.${key}` : key;
  return `${base}[${JSON.stringify(key)}]`;
}

function editDistance(a, b) {
  const d = Array.from({ length: a.length + 1 }, (_, i) => [i]);
  for (let j = 1; j <= b.length; j++) d[0][j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      d[i][j] = Math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
  }
  return d[a.length][b.length];
}

function unknownField(key, known) {
  let best = null;
  let bestD = Infinity;
  for (const k of known) {
    const dist = editDistance(key.toLowerCase(), k.toLowerCase());
    if (dist < bestD) { bestD = dist; best = k; }
  }
  const hint = best !== null && bestD <= Math.max(2, Math.floor(key.length / 4)) ? ` (did you mean "${best}"?)` : "";
  return `unknown field "${key}"${hint}`;
}

function walk(value, type, at, problems) {
  if (value === null || value === undefined) return;
  type = deref(type);
  switch (type.k) {
    case "scalar":
    case "free":
      return;
    case "array":
      if (Array.isArray(value)) value.forEach((v, i) => walk(v, type.of, childPath(at, i), problems));
      return;
    case "union": {
      const branches = type.of.map(deref);
      const fits = branches.filter((b) => (Array.isArray(value) ? b.k === "array" : isPlainObject(value) ? b.k === "object" : false));
      if (fits.length === 1) walk(value, fits[0], at, problems);
      return; // scalars, or ambiguous: ajv has checked the type
    }
    case "object": {
      if (!isPlainObject(value)) return; // a type error: validate() reports it
      if (type.props.size === 0 && !type.index) return; // free-form (RawExtension, JSON, ...)
      for (const [key, v] of Object.entries(value)) {
        if (type.props.has(key)) walk(v, type.props.get(key), childPath(at, key), problems);
        else if (type.index) walk(v, type.index, childPath(at, key), problems);
        else problems.push({ path: childPath(at, key), message: unknownField(key, type.props.keys()) });
      }
      return;
    }
    default:
      throw new Error(`internal: unexpected type ${JSON.stringify(type)}`);
  }
}

// ---------------------------------------------------------------------------
// Documents
// ---------------------------------------------------------------------------

// apiVersion + kind -> {Model, declFile} from kubernetes-models, or null.
async function modelFor(apiVersion, kind) {
  if (typeof apiVersion !== "string" || typeof kind !== "string") return null;
  if (!/^[a-z0-9.-]*\/?v\d+(alpha\d+|beta\d+)?$/.test(apiVersion) || !/^[A-Za-z0-9]+$/.test(kind)) return null;
  const declFile = path.join(MODELS, ...apiVersion.split("/"), `${kind}.d.ts`);
  if (!fs.existsSync(declFile)) return null;
  const mod = await import(`kubernetes-models/${apiVersion}/${kind}`);
  if (!mod[kind]) return null;
  return { Model: mod[kind], declFile, iface: `I${kind}` };
}

function ajvPath(instancePath) {
  let out = "";
  for (const seg of instancePath.split("/").slice(1)) {
    const key = seg.replace(/~1/g, "/").replace(/~0/g, "~");
    out = childPath(out, /^\d+$/.test(key) ? Number(key) : key);
  }
  return out || "(top level)";
}

function ajvMessage(err) {
  let msg = err.message || err.keyword;
  if (err.keyword === "enum" && err.params && err.params.allowedValues) msg += ` (${err.params.allowedValues.map((v) => JSON.stringify(v)).join(", ")})`;
  if (err.keyword === "required" && err.params && err.params.missingProperty) msg = `missing required field "${err.params.missingProperty}"`;
  return msg;
}

function normalise(obj) {
  // The API server decodes base64 fields with Go's encoding/base64, which
  // skips line breaks; kustomize writes long values folded over lines.
  const fold = (m) => {
    if (!isPlainObject(m)) return m;
    return Object.fromEntries(Object.entries(m).map(([k, v]) => [k, typeof v === "string" ? v.replace(/[\r\n]/g, "") : v]));
  };
  if (obj.apiVersion === "v1" && obj.kind === "Secret" && obj.data) return { ...obj, data: fold(obj.data) };
  if (obj.apiVersion === "v1" && obj.kind === "ConfigMap" && obj.binaryData) return { ...obj, binaryData: fold(obj.binaryData) };
  return obj;
}

async function validateObject(obj) {
  const problems = [];
  const m = await modelFor(obj.apiVersion, obj.kind);
  if (!m) {
    problems.push({ path: "(top level)", message: `no schema for apiVersion ${JSON.stringify(obj.apiVersion)} kind ${JSON.stringify(obj.kind)} in kubernetes-models` });
    return problems;
  }
  const data = normalise(obj);
  try {
    new m.Model(data).validate();
  } catch (e) {
    if (!Array.isArray(e.errors)) throw e;
    // A value that fits no branch of a oneOf (IntOrString, Quantity) gets one
    // line naming what each branch wanted, not one line per branch.
    const oneOf = new Set(e.errors.filter((err) => err.keyword === "oneOf").map((err) => err.instancePath));
    const seen = new Set();
    for (const err of e.errors) {
      const at = err.instancePath || "";
      if (oneOf.has(at)) {
        if (seen.has(at)) continue;
        seen.add(at);
        const wanted = e.errors.filter((x) => x.instancePath === at && x.keyword !== "oneOf").map(ajvMessage);
        problems.push({ path: ajvPath(at), message: wanted.length ? [...new Set(wanted)].join(", or ") : ajvMessage(err) });
        continue;
      }
      problems.push({ path: ajvPath(at), message: ajvMessage(err) });
    }
  }
  walk(data, { k: "ref", name: m.iface, file: m.declFile }, "", problems);
  return problems;
}

async function validateText(text, label, YAML) {
  const lines = [];
  const docs = YAML.parseAllDocuments(text, { version: "1.1", uniqueKeys: true, prettyErrors: false });
  const list = Array.isArray(docs) ? docs : [docs];
  let count = 0;
  for (const [i, doc] of list.entries()) {
    const where = `document ${i + 1}`;
    if (doc.errors && doc.errors.length) {
      for (const e of doc.errors) lines.push(`${label}: ${where}: YAML: ${e.message.split("\n")[0]}`);
      continue;
    }
    const obj = doc.toJS({ maxAliasCount: 100 });
    if (obj === null || obj === undefined) continue;
    count++;
    if (!isPlainObject(obj)) {
      lines.push(`${label}: ${where}: (top level): expected a Kubernetes object (a mapping)`);
      continue;
    }
    const name = (isPlainObject(obj.metadata) && obj.metadata.name) || `(${where}, no name)`;
    const id = `${obj.kind || "(no kind)"}/${name}`;
    for (const p of await validateObject(obj)) lines.push(`${label}: ${id}: ${p.path}: ${p.message}`);
  }
  return { lines, count };
}

async function main(argv) {
  if (argv[0] === "--installed") return installedMatchesLock() ? 0 : 1;
  if (argv.length === 0 || argv.some((a) => a.startsWith("-") && a !== "-")) {
    console.error("usage: node validate.mjs FILE... | -\n       node validate.mjs --installed");
    return 2;
  }
  if (!fs.existsSync(MODELS)) {
    console.error(`validate.mjs: ${MODELS} is missing: npm ci --prefix ${HERE} --no-audit --no-fund`);
    return 2;
  }
  const YAML = (await import("yaml")).default;
  let bad = 0;
  let objects = 0;
  for (const arg of argv) {
    const label = arg === "-" ? "<stdin>" : arg;
    let text;
    try {
      text = fs.readFileSync(arg === "-" ? 0 : arg, "utf8");
    } catch (e) {
      console.log(`${label}: cannot read: ${e.message}`);
      bad++;
      continue;
    }
    const { lines, count } = await validateText(text, label, YAML);
    objects += count;
    for (const l of lines) console.log(l);
    bad += lines.length;
  }
  console.error(`validate.mjs: ${objects} objects, ${bad} problems`);
  return bad ? 1 : 0;
}

main(process.argv.slice(2)).then(
  (code) => { process.exitCode = code; },
  (e) => { console.error(`validate.mjs: ${e.stack || e}`); process.exitCode = 2; },
);
