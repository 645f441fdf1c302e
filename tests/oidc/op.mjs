// Test-only OpenID provider for llm-proxy's auth tests: a Keycloak-shaped realm served by oidc-provider.
//
//   node op.mjs [--port 0] [--realm konveyor] [--host 127.0.0.1]
//
// Serves /realms/<realm>/.well-known/openid-configuration, .../protocol/openid-connect/{token,certs},
// .../token/introspect (RFC 7662, for the resource server client llm-proxy-introspect) and .../revoke.
// Tokens requested with resource=urn:konveyor-opaque are opaque instead of JWTs.
// The issuer follows the Host header the way Keycloak's frontend URL does: a request for
// 127.0.0.1:<port> gets issuer http://127.0.0.1:<port>/realms/<realm>, one for localhost:<port> gets
// http://localhost:<port>/realms/<realm> (same realm, same keys: "internal URL and external route").
// Signing keys (RS256 and ES256) are generated at each start, so a restart rotates them.
// Prints one JSON line {"event":"ready","port":N,...} on stdout when it accepts requests.

import * as crypto from 'node:crypto';
import * as http from 'node:http';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    host: { type: 'string', default: '127.0.0.1' },
    realm: { type: 'string', default: 'konveyor' },
  },
});

const REALM = args.realm;
const PREFIX = `/realms/${REALM}`;
const AUDIENCE = 'konveyor-api';
const RESOURCE = 'urn:konveyor-api'; // resource indicators must be absolute URIs; `aud` is AUDIENCE
// Tokens for this resource are opaque (not JWTs): the proxy checks them by RFC 7662 introspection.
const OPAQUE_RESOURCE = 'urn:konveyor-opaque';
// The resource server's own client: the only one allowed to introspect tokens.
const INTROSPECTOR = 'llm-proxy-introspect';
const API_SCOPES = 'openid profile email models:read models:write';

// ---- users and clients of the realm ---------------------------------------------------------------

const USERS = {
  alice: {
    sub: 'f3b1c1a0-0000-4000-8000-00000000a11c',
    password: 'alice-password',
    email: 'alice@example.com',
    realmRoles: ['llm-user', 'offline_access'],
    clientRoles: { 'konveyor-api': ['chat'] },
    groups: ['/llm-users'],
  },
  bob: {
    sub: 'f3b1c1a0-0000-4000-8000-000000000b0b',
    password: 'bob-password',
    email: 'bob@example.com',
    realmRoles: ['guest'],
    clientRoles: {},
    groups: ['/guests'],
  },
  root: {
    sub: 'f3b1c1a0-0000-4000-8000-0000000000ad',
    password: 'root-password',
    email: 'root@example.com',
    realmRoles: ['llm-user', 'llm-admin'],
    clientRoles: {},
    groups: ['/admins'],
  },
};

// Client ids ending in "-es" get ES256 access tokens, the others RS256.
const CLIENT_ROLES = {
  'llm-cli': ['llm-user'],
  'llm-cli-es': ['llm-user'],
};

const clients = Object.keys(CLIENT_ROLES).map((clientId) => ({
  client_id: clientId,
  client_secret: `${clientId}-secret`,
  grant_types: ['client_credentials', 'password'],
  response_types: [],
  redirect_uris: [],
  token_endpoint_auth_method: 'client_secret_post',
  scope: API_SCOPES,
}));
// The usage dashboard's login (authorization code + PKCE, a public client). Native: any loopback port matches the
// redirect URI (RFC 8252), so a proxy on a free port can use it.
clients.push({
  client_id: 'llm-proxy-ui',
  application_type: 'native',
  grant_types: ['authorization_code'],
  response_types: ['code'],
  redirect_uris: ['http://127.0.0.1/ui/callback'],
  token_endpoint_auth_method: 'none',
  scope: API_SCOPES,
});
clients.push({
  client_id: INTROSPECTOR,
  client_secret: `${INTROSPECTOR}-secret`,
  grant_types: [],
  response_types: [],
  redirect_uris: [],
  token_endpoint_auth_method: 'client_secret_basic',
});

// ---- keys: fresh at every start ------------------------------------------------------------------

function freshJwk(type, options, alg) {
  const { privateKey } = crypto.generateKeyPairSync(type, options);
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, alg, use: 'sig', kid: `${alg.toLowerCase()}-${crypto.randomBytes(8).toString('hex')}` };
}

const jwks = {
  keys: [
    freshJwk('rsa', { modulusLength: 2048 }, 'RS256'),
    freshJwk('ec', { namedCurve: 'P-256' }, 'ES256'),
  ],
};

// ---- provider configuration ----------------------------------------------------------------------

function tokenAlg(client) {
  return client?.clientId?.endsWith('-es') ? 'ES256' : 'RS256';
}

function getResourceServerInfo(_ctx, resource, client) {
  if (resource === OPAQUE_RESOURCE) {
    return { scope: API_SCOPES, audience: 'konveyor-opaque', accessTokenTTL: 300, accessTokenFormat: 'opaque' };
  }
  if (resource !== RESOURCE) {
    throw new errors.InvalidTarget(`unknown resource ${resource}`);
  }
  return {
    scope: API_SCOPES,
    audience: AUDIENCE,
    accessTokenTTL: 300,
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg: tokenAlg(client) } },
  };
}

function keycloakClaims(user, clientId) {
  const resourceAccess = {};
  for (const [client, roles] of Object.entries(user.clientRoles)) {
    resourceAccess[client] = { roles };
  }
  return {
    typ: 'Bearer',
    azp: clientId,
    preferred_username: user.username,
    email: user.email,
    email_verified: true,
    realm_access: { roles: user.realmRoles },
    resource_access: resourceAccess,
    groups: user.groups,
  };
}

function configuration() {
  return {
    clients,
    jwks,
    routes: {
      token: '/protocol/openid-connect/token',
      jwks: '/protocol/openid-connect/certs',
      userinfo: '/protocol/openid-connect/userinfo',
      introspection: '/protocol/openid-connect/token/introspect',
      revocation: '/protocol/openid-connect/revoke',
      authorization: '/protocol/openid-connect/auth',
      end_session: '/protocol/openid-connect/logout',
    },
    cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
    scopes: ['openid', 'profile', 'email', 'models:read', 'models:write', 'offline_access'],
    features: {
      // The built-in login and consent pages (login: a user's `sub`; the password is not checked), for the
      // dashboard's browser test.
      devInteractions: { enabled: true },
      clientCredentials: { enabled: true },
      introspection: {
        enabled: true,
        // Only the resource server may read introspection answers (the others get {"active": false}).
        allowedPolicy: async (_ctx, client) => client.clientId === INTROSPECTOR,
      },
      revocation: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => RESOURCE,
        useGrantedResource: () => true,
        getResourceServerInfo,
      },
    },
    enabledJWA: {
      idTokenSigningAlgValues: ['RS256', 'ES256'],
    },
    ttl: {
      AccessToken: 300,
      ClientCredentials: 300,
      Grant: 300,
      IdToken: 300,
      Interaction: 300,
      Session: 300,
    },
    async findAccount(_ctx, sub) {
      const entry = Object.entries(USERS).find(([, u]) => u.sub === sub);
      if (!entry) return undefined;
      const [username, user] = entry;
      return {
        accountId: sub,
        async claims() {
          return { sub, preferred_username: username, email: user.email };
        },
      };
    },
    async extraTokenClaims(_ctx, token) {
      if (token.kind === 'ClientCredentials') {
        return {
          typ: 'Bearer',
          azp: token.clientId,
          preferred_username: `service-account-${token.clientId}`,
          realm_access: { roles: CLIENT_ROLES[token.clientId] || [] },
          groups: [],
        };
      }
      const entry = Object.entries(USERS).find(([, u]) => u.sub === token.accountId);
      if (!entry) return undefined;
      const [username, user] = entry;
      return keycloakClaims({ ...user, username }, token.clientId);
    },
  };
}

// Resource Owner Password Credentials, which oidc-provider does not ship: checks the fixed test users.
async function passwordGrant(ctx) {
  const { provider, client, params } = ctx.oidc;
  const user = Object.hasOwn(USERS, String(params.username)) ? USERS[params.username] : undefined;
  const given = Buffer.from(String(params.password ?? ''));
  const wanted = Buffer.from(user ? user.password : '');
  if (!user || given.length !== wanted.length || !crypto.timingSafeEqual(given, wanted)) {
    throw new errors.InvalidGrant('invalid user credentials');
  }
  const wantedScopes = new Set(String(params.scope || 'openid profile email models:read').split(' '));
  const allowed = new Set(API_SCOPES.split(' '));
  const scope = [...wantedScopes].filter((s) => allowed.has(s)).join(' ');

  const resource = params.resource === OPAQUE_RESOURCE ? OPAQUE_RESOURCE : RESOURCE;
  const info = getResourceServerInfo(ctx, resource, client);
  // A stored grant, so that introspection (which looks the grant up) sees the token as active.
  const grant = new provider.Grant({ accountId: user.sub, clientId: client.clientId });
  grant.addResourceScope(resource, scope);
  const grantId = await grant.save();
  const token = new provider.AccessToken({
    accountId: user.sub,
    client,
    gty: 'password',
    grantId,
    scope,
  });
  token.resourceServer = new provider.ResourceServer(resource, info);
  ctx.oidc.entity('AccessToken', token);
  const value = await token.save();
  ctx.body = {
    access_token: value,
    expires_in: token.expiration,
    token_type: token.tokenType,
    scope,
  };
}

function makeProvider(issuer) {
  // Each Provider instance gets its own copy of the configuration (oidc-provider consumes parts of it).
  const provider = new Provider(issuer, { ...configuration(), jwks: structuredClone(jwks) });
  provider.proxy = false;
  provider.registerGrantType('password', passwordGrant, ['username', 'password', 'scope', 'resource']);
  provider.on('server_error', (_ctx, err) => {
    process.stderr.write(`op server_error: ${err.stack}\n`);
  });
  return provider;
}

// ---- HTTP server: Keycloak paths, issuer chosen by Host -------------------------------------------

const providers = new Map(); // host -> callback

function callbackFor(host, port) {
  const name = host.startsWith('localhost') ? 'localhost' : args.host;
  const key = `${name}:${port}`;
  if (!providers.has(key)) {
    providers.set(key, makeProvider(`http://${key}${PREFIX}`).callback());
  }
  return providers.get(key);
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://placeholder');
  if (!url.pathname.startsWith(`${PREFIX}/`)) {
    res.statusCode = 404;
    res.end('not found');
    return;
  }
  // Mount like express does: originalUrl keeps the prefix, url is what the provider routes on.
  req.originalUrl = req.url;
  req.url = `${url.pathname.slice(PREFIX.length)}${url.search}`;
  const { port } = server.address();
  callbackFor(req.headers.host || '', port)(req, res);
});

const shutdown = () => server.close(() => process.exit(0));
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

server.listen(Number(args.port), args.host, () => {
  const { port } = server.address();
  const kids = Object.fromEntries(jwks.keys.map((k) => [k.alg, k.kid]));
  process.stdout.write(`${JSON.stringify({
    event: 'ready', port, realm: REALM, issuer: `http://${args.host}:${port}${PREFIX}`, kids,
  })}\n`);
});
