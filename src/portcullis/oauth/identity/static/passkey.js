"use strict";
// Passkey ceremonies for the account pages (served from /account/static/: the pages'
// CSP allows scripts from this origin only). A button with data-passkey="login" or
// "register" fetches options from data-options, runs the WebAuthn ceremony and posts
// the result to data-verify; the server answers {"redirect": "/path"}.
(function () {
  function b64urlToBuf(s) {
    s = s.replace(/-/g, "+").replace(/_/g, "/");
    while (s.length % 4) s += "=";
    const bin = atob(s);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out.buffer;
  }
  function bufToB64url(buf) {
    const bytes = new Uint8Array(buf);
    let bin = "";
    for (let i = 0; i < bytes.length; i++) bin += String.fromCharCode(bytes[i]);
    return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }
  function csrf() {
    const m = document.querySelector('meta[name="csrf-token"]');
    return m ? m.content : "";
  }
  async function post(url, body) {
    const r = await fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: {"content-type": "application/json", "x-csrf-token": csrf()},
      body: JSON.stringify(body || {}),
    });
    let doc = {};
    try { doc = await r.json(); } catch (e) { doc = {}; }
    if (!r.ok) throw new Error(doc.message || "The passkey request failed.");
    return doc;
  }
  function creationOptions(o) {
    o.challenge = b64urlToBuf(o.challenge);
    o.user.id = b64urlToBuf(o.user.id);
    (o.excludeCredentials || []).forEach(function (c) { c.id = b64urlToBuf(c.id); });
    return o;
  }
  function requestOptions(o) {
    o.challenge = b64urlToBuf(o.challenge);
    (o.allowCredentials || []).forEach(function (c) { c.id = b64urlToBuf(c.id); });
    return o;
  }
  function credentialJSON(cred) {
    const r = cred.response;
    const out = {
      id: cred.id, rawId: bufToB64url(cred.rawId), type: cred.type,
      clientExtensionResults: cred.getClientExtensionResults ? cred.getClientExtensionResults() : {},
      response: {clientDataJSON: bufToB64url(r.clientDataJSON)},
    };
    if (cred.authenticatorAttachment) out.authenticatorAttachment = cred.authenticatorAttachment;
    if (r.attestationObject) {
      out.response.attestationObject = bufToB64url(r.attestationObject);
      if (r.getTransports) out.response.transports = r.getTransports();
    }
    if (r.authenticatorData) {
      out.response.authenticatorData = bufToB64url(r.authenticatorData);
      out.response.signature = bufToB64url(r.signature);
      if (r.userHandle) out.response.userHandle = bufToB64url(r.userHandle);
    }
    return out;
  }
  async function run(btn) {
    const status = document.getElementById("passkey-status");
    function say(text) { if (status) status.textContent = text; }
    if (!window.PublicKeyCredential) { say("This browser does not support passkeys."); return; }
    btn.disabled = true;
    try {
      const opts = await post(btn.dataset.options, {});
      const cred = btn.dataset.passkey === "register"
        ? await navigator.credentials.create({publicKey: creationOptions(opts)})
        : await navigator.credentials.get({publicKey: requestOptions(opts)});
      const body = {credential: credentialJSON(cred)};
      const name = document.getElementById("passkey-name");
      if (name) body.name = name.value;
      const res = await post(btn.dataset.verify, body);
      say("Done.");
      window.location.assign(res.redirect);
    } catch (e) {
      say(e && e.message ? e.message : "The passkey request failed.");
    } finally {
      btn.disabled = false;
    }
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("button[data-passkey]").forEach(function (b) {
      b.addEventListener("click", function () { run(b); });
    });
  });
})();
