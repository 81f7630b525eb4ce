// An HBONE client on Node's http2 (nghttp2 inside): mTLS with a SPIFFE certificate, one
// request on one connection, a JSON line of what happened on stdout.
//
//   node hbone_client.js HOST PORT METHOD AUTHORITY CA CERT KEY PAYLOAD_BYTES [early]
//
// CONNECT: once the 200 arrives (as ztunnel's own client does), writes PAYLOAD_BYTES random
// bytes, half-closes (END_STREAM) and reads until the server ends the stream; with `early`
// the bytes and END_STREAM go out right behind the request instead, before any response,
// which RFC 9113 §8.5 allows. Reports the response status, the SHA-256 of what was sent and
// of what came back, and the server certificate's SAN. Other methods: reports the status.
// HBONE_CLIENT_TIMEOUT_MS bounds the whole run (default 10 s). Used by
// tests/interop/test_node_http2.py; exits 0 whenever it could report.
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const http2 = require('http2');
const tls = require('tls');

const [host, port, method, authority, caPath, certPath, keyPath, size, mode] =
  process.argv.slice(2);
const early = mode === 'early';
const TIMEOUT_MS = Number(process.env.HBONE_CLIENT_TIMEOUT_MS || 10000);

const report = { status: null, error: null, peer_san: null };
const timer = setTimeout(() => finish({ error: `no result within ${TIMEOUT_MS} ms` }), TIMEOUT_MS);

function finish(extra) {
  clearTimeout(timer);
  process.stdout.write(JSON.stringify({ ...report, ...extra }) + '\n');
  process.exit(0);
}

const sha256 = (buf) => crypto.createHash('sha256').update(buf).digest('hex');

// createConnection so TCP_NODELAY can be set: session.socket refuses it
// (ERR_HTTP2_NO_SOCKET_MANIPULATION). No SNI: HBONE peers have SPIFFE URIs, not names.
const session = http2.connect(`https://${host}:${port}`, {
  createConnection: () => {
    const socket = tls.connect({
      host,
      port: Number(port),
      ca: fs.readFileSync(caPath),
      cert: fs.readFileSync(certPath),
      key: fs.readFileSync(keyPath),
      ALPNProtocols: ['h2'],
      minVersion: 'TLSv1.3',
      rejectUnauthorized: true,
      checkServerIdentity: () => undefined,
    });
    socket.setNoDelay(true);
    return socket;
  },
});
session.on('error', (err) => finish({ error: `session: ${err.message}` }));
session.on('connect', () => {
  report.peer_san = session.socket.getPeerCertificate().subjectaltname || null;
  report.alpn = session.socket.alpnProtocol;
});

const headers =
  method === 'CONNECT'
    ? { ':method': 'CONNECT', ':authority': authority }
    : { ':method': method, ':authority': authority, ':scheme': 'https', ':path': '/' };
const req = session.request(headers, { endStream: method !== 'CONNECT' });
const received = [];
req.on('response', (h) => {
  report.status = h[':status'];
  if (report.status !== 200) {
    finish({});
  } else if (method === 'CONNECT' && !early) {
    send();
  }
});
req.on('data', (chunk) => received.push(chunk));
req.on('end', () => {
  const body = Buffer.concat(received);
  finish({ received_bytes: body.length, received_sha256: sha256(body) });
});
req.on('error', (err) => finish({ error: `stream: ${err.message}` }));

function send() {
  const payload = crypto.randomBytes(Number(size));
  report.sent_bytes = payload.length;
  report.sent_sha256 = sha256(payload);
  req.end(payload);
}

if (method === 'CONNECT' && early) {
  send();
}
