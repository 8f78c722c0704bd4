// The reference authorization server for scripts/bench/oauth_bench.sh: panva's
// oidc-provider (OpenID Certified), configured like the Portcullis side of the benchmark.
//
//   node server.mjs PORT            (or BENCH_PORT=PORT node server.mjs)
//
// One process, loopback only, the default in-memory adapter, one confidential client
// (client_secret_basic, client_credentials only), client-credentials access tokens as
// ES256-signed JWTs (RFC 9068, `typ: at+jwt`) through the resource indicators feature,
// introspection enabled. The client's id and secret come from BENCH_CLIENT_ID and
// BENCH_CLIENT_SECRET. Endpoints are moved to Portcullis's paths (/oauth2/token,
// /oauth2/introspect) so both servers take the same wrk scripts.
//
// oidc-provider refuses to introspect structured (JWT) access tokens: its introspection
// endpoint answers `unsupported_token_type` for them. The benchmark therefore introspects
// an opaque access token there, issued for a second resource (OPAQUE_RESOURCE below);
// docs/benchmarks.md says so next to the figures.
import { generateKeyPairSync, randomBytes } from 'node:crypto';

import Provider from 'oidc-provider';

const port = Number(process.argv[2] ?? process.env.BENCH_PORT ?? 18201);
const host = '127.0.0.1';
const issuer = `http://${host}:${port}`;
const clientId = process.env.BENCH_CLIENT_ID ?? 'bench-client';
const clientSecret = process.env.BENCH_CLIENT_SECRET ?? 'bench-secret-not-for-production';
const JWT_RESOURCE = process.env.BENCH_RESOURCE ?? 'https://api.bench';
const OPAQUE_RESOURCE = 'urn:bench:opaque';
const SCOPE = 'api:read';
const TTL = 600; // seconds, Portcullis's default access-token lifetime

// A fresh ES256 (P-256) signing key per run, as Portcullis makes its own.
const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: 'bench-es256', use: 'sig', alg: 'ES256' };

const provider = new Provider(issuer, {
  clients: [{
    client_id: clientId,
    client_secret: clientSecret,
    token_endpoint_auth_method: 'client_secret_basic',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    scope: SCOPE,
    id_token_signed_response_alg: 'ES256', // unused here; the default (RS256) needs an RSA key
  }],
  jwks: { keys: [jwk] },
  scopes: [SCOPE],
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  routes: { token: '/oauth2/token', introspection: '/oauth2/introspect' },
  ttl: { ClientCredentials: TTL, AccessToken: TTL },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: {
      enabled: true,
      // The caller must be an authenticated client (the endpoint's client authentication
      // does that); like Portcullis, a client may introspect its own tokens.
      allowedPolicy: async (_ctx, client, token) => token.clientId === client.clientId,
    },
    resourceIndicators: {
      enabled: true,
      defaultResource: async () => JWT_RESOURCE,
      useGrantedResource: async () => true,
      getResourceServerInfo: async (_ctx, resourceIndicator) => {
        if (resourceIndicator === JWT_RESOURCE) {
          return {
            scope: SCOPE,
            audience: JWT_RESOURCE,
            accessTokenTTL: TTL,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'ES256' } },
          };
        }
        if (resourceIndicator === OPAQUE_RESOURCE) {
          return { scope: SCOPE, audience: OPAQUE_RESOURCE, accessTokenTTL: TTL, accessTokenFormat: 'opaque' };
        }
        throw new Provider.errors.InvalidTarget();
      },
    },
  },
});

// Quiet: no per-request logging; report unexpected server errors once each, without tokens.
const seen = new Set();
provider.on('server_error', (_ctx, err) => {
  if (!seen.has(err.message)) {
    seen.add(err.message);
    console.error(`oidc-provider server_error: ${err.message}`);
  }
});

const server = provider.listen(port, host, () => {
  console.log(`oidc-provider ${issuer} (pid ${process.pid}, node ${process.version})`);
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => server.close(() => process.exit(0)));
}
