// The page's only script: POST the form as JSON, show the link, copy, QR.
"use strict";

const form = document.getElementById("shorten-form");
const errorBox = document.getElementById("error");
const result = document.getElementById("result");
const shortLink = document.getElementById("short-url");

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  errorBox.hidden = true;
  result.hidden = true;
  const body = { url: document.getElementById("url").value };
  const alias = document.getElementById("alias").value.trim();
  const ttl = document.getElementById("ttl").value;
  if (alias) body.alias = alias;
  if (ttl) body.ttl_s = Number(ttl);

  let reply;
  try {
    reply = await fetch("/api/links", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  } catch (failure) {
    showError("the shortener did not answer: " + failure);
    return;
  }
  const data = await reply.json();
  if (!reply.ok) {
    showError(data.detail + (data.fix ? " (" + data.fix + ")" : ""));
    return;
  }
  // textContent and href only: the target is never parsed as HTML.
  shortLink.textContent = data.short_url;
  shortLink.href = data.short_url;
  document.getElementById("qr").src =
    "/api/links/" + encodeURIComponent(data.code) + "/qr.svg";
  result.hidden = false;
});

document.getElementById("copy").addEventListener("click", async () => {
  await navigator.clipboard.writeText(shortLink.textContent);
  document.getElementById("copied").hidden = false;
});

function showError(text) {
  errorBox.textContent = text;
  errorBox.hidden = false;
}
