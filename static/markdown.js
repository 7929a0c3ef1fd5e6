// A small Markdown renderer for model output in the chat: paragraphs, headings, lists,
// block quotes, rules, fenced code blocks, and inline code, bold, italics and links.
//
// Safety by construction: it builds DOM nodes with createElement and Text nodes only,
// never innerHTML, so whatever the model writes ("<script>", "<img onerror>") is shown
// as text. Links open only http(s) and mailto addresses. Output still being streamed
// renders as it stands (an unclosed code fence is a code block up to the end).
"use strict";

const MARKDOWN_BLOCK = {
  fence: /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/,
  heading: /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/,
  rule: /^ {0,3}([-*_])(\s*\1){2,}\s*$/,
  quote: /^ {0,3}>\s?(.*)$/,
  bullet: /^(\s*)[-*+]\s+(.*)$/,
  ordered: /^(\s*)(\d{1,9})[.)]\s+(.*)$/,
};
// One inline construct per alternative: code span, bold, italics, link.
const MARKDOWN_INLINE =
  /(`+)([\s\S]*?[^`])\1(?!`)|\*\*(?=\S)([\s\S]*?\S)\*\*|__(?=\S)([\s\S]*?\S)__|\*(?=[^\s*])([\s\S]*?[^\s*])\*|(?<!\w)_(?=[^\s_])([\s\S]*?[^\s_])_(?!\w)|\[([^\]\n]+)\]\(([^()\s]+)\)/g;
const SAFE_LINK = /^(https?:\/\/|mailto:)/i;

function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  fragment.append(...markdownBlocks(text.replace(/\r\n?/g, "\n").split("\n")));
  return fragment;
}

function markdownBlocks(lines) {
  const nodes = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let match;
    if (!line.trim()) {
      i += 1;
    } else if ((match = MARKDOWN_BLOCK.fence.exec(line))) {
      const end = lines.findIndex((l, j) => j > i && l.trim().startsWith(match[1]) && !l.trim().slice(match[1].length).trim());
      const stop = end === -1 ? lines.length : end;
      nodes.push(codeBlock(lines.slice(i + 1, stop).join("\n"), match[2]));
      i = stop + 1;
    } else if ((match = MARKDOWN_BLOCK.heading.exec(line))) {
      nodes.push(element(`h${Math.min(6, match[1].length + 2)}`, markdownInline(match[2])));
      i += 1;
    } else if (MARKDOWN_BLOCK.rule.test(line)) {
      nodes.push(document.createElement("hr"));
      i += 1;
    } else if (MARKDOWN_BLOCK.quote.test(line)) {
      const quoted = [];
      while (i < lines.length && (match = MARKDOWN_BLOCK.quote.exec(lines[i]))) {
        quoted.push(match[1]);
        i += 1;
      }
      nodes.push(element("blockquote", markdownBlocks(quoted)));
    } else if (MARKDOWN_BLOCK.bullet.test(line) || MARKDOWN_BLOCK.ordered.test(line)) {
      i = markdownList(lines, i, nodes);
    } else {
      const paragraph = [];
      while (i < lines.length && lines[i].trim() && !startsBlock(lines[i])) {
        paragraph.push(lines[i].trim());
        i += 1;
      }
      const parts = [];
      paragraph.forEach((l, n) => {
        if (n) parts.push(document.createElement("br"));
        parts.push(...markdownInline(l));
      });
      nodes.push(element("p", parts));
    }
  }
  return nodes;
}

function startsBlock(line) {
  return Object.values(MARKDOWN_BLOCK).some((pattern) => pattern.test(line));
}

// A list and its items; an item's following lines that are indented more belong to it.
function markdownList(lines, start, nodes) {
  const ordered = !MARKDOWN_BLOCK.bullet.test(lines[start]);
  const list = document.createElement(ordered ? "ol" : "ul");
  const first = MARKDOWN_BLOCK.ordered.exec(lines[start]);
  if (ordered && first[2] !== "1") list.start = Number(first[2]);
  const indent = (ordered ? first : MARKDOWN_BLOCK.bullet.exec(lines[start]))[1].length;
  let i = start;
  while (i < lines.length) {
    const match = ordered ? MARKDOWN_BLOCK.ordered.exec(lines[i]) : MARKDOWN_BLOCK.bullet.exec(lines[i]);
    if (!match || match[1].length !== indent) break;
    const body = [ordered ? match[3] : match[2]];
    i += 1;
    while (i < lines.length && lines[i].trim() && leadingSpaces(lines[i]) > indent) {
      body.push(lines[i].slice(Math.min(leadingSpaces(lines[i]), indent + 2)));
      i += 1;
    }
    const item = document.createElement("li");
    const blocks = markdownBlocks(body);
    // A one-paragraph item shows its text without the paragraph's margins.
    if (blocks.length && blocks[0].tagName === "P") item.append(...blocks.shift().childNodes);
    item.append(...blocks);
    list.append(item);
  }
  nodes.push(list);
  return i;
}

function leadingSpaces(line) {
  return line.length - line.trimStart().length;
}

function codeBlock(code, language) {
  const pre = document.createElement("pre");
  const inner = element("code", [code]);
  if (language) inner.dataset.language = language;
  pre.append(inner);
  return pre;
}

function markdownInline(text) {
  const nodes = [];
  let last = 0;
  for (const match of text.matchAll(MARKDOWN_INLINE)) {
    if (match.index > last) nodes.push(text.slice(last, match.index));
    const [, ticks, code, bold1, bold2, em1, em2, label, href] = match;
    if (ticks) nodes.push(element("code", [code.replace(/^ (.*) $/, "$1")]));
    else if (bold1 ?? bold2) nodes.push(element("strong", markdownInline(bold1 ?? bold2)));
    else if (em1 ?? em2) nodes.push(element("em", markdownInline(em1 ?? em2)));
    else nodes.push(link(label, href));
    last = match.index + match[0].length;
  }
  if (last < text.length) nodes.push(text.slice(last));
  return nodes;
}

function link(label, href) {
  if (!SAFE_LINK.test(href)) return `[${label}](${href})`; // javascript: and friends stay text
  const anchor = element("a", markdownInline(label));
  anchor.href = href;
  anchor.rel = "noopener noreferrer nofollow";
  anchor.target = "_blank";
  return anchor;
}

// An element holding children: nodes, or strings as Text nodes (never parsed as HTML).
function element(tag, children) {
  const node = document.createElement(tag);
  node.append(...children);
  return node;
}
