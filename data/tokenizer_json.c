/*
 * data/tokenizer_json.c - Hugging Face tokenizer.json: reading (BPE models with a ByteLevel
 * pre-tokenizer and decoder, the added tokens) and writing.
 */
#define _POSIX_C_SOURCE 200809L

#include "data/tokenizer_int.h"
#include "launch/errmsg.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static const char PAT_GPT2[] =
	"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char PAT_LLAMA3[] =
	"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
	"[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char PAT_QWEN2[] =
	"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
	"[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/* A regex with literal CR and LF characters written as the escapes \r and \n (malloc'd). */
static char *escape_crlf(const char *s)
{
	size_t n = strlen(s), k = 0;
	char *o = tok_xrealloc(NULL, 2 * n + 1);

	for (size_t i = 0; i < n; i++) {
		if (s[i] == '\r' || s[i] == '\n') {
			o[k++] = '\\';
			o[k++] = s[i] == '\r' ? 'r' : 'n';
		} else {
			o[k++] = s[i];
		}
	}
	o[k] = 0;
	return o;
}

/* obj[key] as a boolean (absent or null: def); -1 when it is something else. */
static int json_bool(const cJSON *obj, const char *key, int def)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);

	if (!v || cJSON_IsNull(v))
		return def;
	if (!cJSON_IsBool(v))
		return -1;
	return cJSON_IsTrue(v);
}

/* A non-negative integral id below TOK_MAX_ID, or -1. */
static long json_id(const cJSON *v)
{
	double d;

	if (!cJSON_IsNumber(v))
		return -1;
	d = v->valuedouble;
	if (d < 0 || d >= TOK_MAX_ID || d != (double)(long)d)
		return -1;
	return (long)d;
}

struct load_ctx {
	const char *name;
	char *err;
	size_t errlen;
};

#define LOAD_ERR(L, ...) (snprintf((L)->err, (L)->errlen, __VA_ARGS__), -1)

static int load_added(struct tokenizer *t, const cJSON *root, struct load_ctx *L)
{
	const cJSON *list = cJSON_GetObjectItemCaseSensitive(root, "added_tokens"), *it;
	int k = 0;

	if (!list || cJSON_IsNull(list))
		return 0;
	if (!cJSON_IsArray(list))
		return LOAD_ERR(L, "%s: added_tokens is %s, not an array", L->name, json_type_a(list));
	cJSON_ArrayForEach(it, list) {
		const cJSON *content = cJSON_GetObjectItemCaseSensitive(it, "content");
		long id = json_id(cJSON_GetObjectItemCaseSensitive(it, "id"));
		struct added a = { 0 };
		int f[5];

		if (!cJSON_IsObject(it) || id < 0)
			return LOAD_ERR(L, "%s: added_tokens[%d].id is missing or not an id in [0, %d)",
					L->name, k, TOK_MAX_ID);
		if (!cJSON_IsString(content))
			return LOAD_ERR(L, "%s: added_tokens[%d].content is %s, not a string", L->name, k,
					json_type_a(content));
		f[0] = json_bool(it, "special", 0);
		f[1] = json_bool(it, "single_word", 0);
		f[2] = json_bool(it, "lstrip", 0);
		f[3] = json_bool(it, "rstrip", 0);
		f[4] = json_bool(it, "normalized", 0);
		for (int j = 0; j < 5; j++)
			if (f[j] < 0)
				return LOAD_ERR(L, "%s: added_tokens[%d]: a flag is not a boolean", L->name,
						k);
		if (id < t->vocab_size && t->tok[id].kind != TK_NONE)
			return LOAD_ERR(L, "%s: added_tokens[%d]: id %ld is given twice", L->name, k, id);
		a = (struct added){ (uint32_t)id, f[0], f[1], f[2], f[3], f[4] };
		tok_set(t, (uint32_t)id, (const uint8_t *)content->valuestring,
			strlen(content->valuestring), TK_ADDED);
		t->tok[id].in_vocab = false;
		tok_add_added(t, &a);
		k++;
	}
	return 0;
}

static int load_vocab(struct tokenizer *t, const cJSON *model, struct load_ctx *L)
{
	const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab"), *it;
	uint8_t *buf = NULL;
	size_t cap = 0;

	if (!cJSON_IsObject(vocab))
		return LOAD_ERR(L, "%s: model.vocab is %s, not an object", L->name, json_type_a(vocab));
	cJSON_ArrayForEach(it, vocab) {
		long id = json_id(it);
		size_t n = strlen(it->string);
		long nb;

		if (id < 0) {
			free(buf);
			return LOAD_ERR(L, "%s: model.vocab[\"%s\"] is not an id in [0, %d)", L->name,
					it->string, TOK_MAX_ID);
		}
		if (id < t->vocab_size && t->tok[id].kind == TK_ADDED) {
			t->tok[id].in_vocab = true;
			continue;
		}
		if (id < t->vocab_size && t->tok[id].kind != TK_NONE) {
			free(buf);
			return LOAD_ERR(L, "%s: model.vocab: id %ld is given twice (\"%s\")", L->name, id,
					it->string);
		}
		RESERVE(buf, cap, n + 1);
		nb = visible_to_bytes(it->string, buf);
		if (nb >= 0)
			tok_set(t, (uint32_t)id, buf, (size_t)nb, TK_BYTES);
		else
			tok_set(t, (uint32_t)id, (const uint8_t *)it->string, n, TK_RAW);
	}
	free(buf);
	tok_index_vocab(t);
	return 0;
}

/* One half of a merge: the id of the byte-level token spelt s, or -1. */
static long merge_half(const struct tokenizer *t, const char *s, size_t n, uint8_t *buf)
{
	char *z = tok_xrealloc(NULL, n + 1);
	long nb, id;

	memcpy(z, s, n);
	z[n] = 0;
	nb = visible_to_bytes(z, buf);
	free(z);
	if (nb < 0)
		return -1;
	id = tok_lookup(t, buf, (size_t)nb);
	return id;
}

static int load_merges(struct tokenizer *t, const cJSON *model, struct load_ctx *L)
{
	const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges"), *it;
	uint8_t *buf = NULL, *cat = NULL;
	size_t cap = 0, cat_cap = 0;
	int k = 0, rc = 0;

	if (!merges || cJSON_IsNull(merges))
		return 0;
	if (!cJSON_IsArray(merges))
		return LOAD_ERR(L, "%s: model.merges is %s, not an array", L->name,
				json_type_a(merges));
	cJSON_ArrayForEach(it, merges) {
		const char *sa, *sb;
		size_t na, nb;
		long a, b, r;

		if (cJSON_IsString(it)) {
			const char *sp = strchr(it->valuestring, ' ');

			sa = it->valuestring;
			if (!sp || strchr(sp + 1, ' ')) {
				rc = LOAD_ERR(L, "%s: model.merges[%d] \"%s\" is not two tokens separated by "
					      "one space", L->name, k, it->valuestring);
				break;
			}
			na = (size_t)(sp - sa);
			sb = sp + 1;
			nb = strlen(sb);
		} else if (cJSON_IsArray(it) && cJSON_GetArraySize(it) == 2 &&
			   cJSON_IsString(cJSON_GetArrayItem(it, 0)) &&
			   cJSON_IsString(cJSON_GetArrayItem(it, 1))) {
			sa = cJSON_GetArrayItem(it, 0)->valuestring;
			sb = cJSON_GetArrayItem(it, 1)->valuestring;
			na = strlen(sa);
			nb = strlen(sb);
		} else {
			rc = LOAD_ERR(L, "%s: model.merges[%d] is neither \"a b\" nor [\"a\", \"b\"]",
				      L->name, k);
			break;
		}
		RESERVE(buf, cap, na + nb + 1);
		a = merge_half(t, sa, na, buf);
		b = merge_half(t, sb, nb, buf);
		if (a < 0 || b < 0) {
			rc = LOAD_ERR(L, "%s: model.merges[%d]: \"%.*s\" is not a byte-level token of "
				      "model.vocab", L->name, k, (int)(a < 0 ? na : nb), a < 0 ? sa : sb);
			break;
		}
		RESERVE(cat, cat_cap, t->tok[a].len + t->tok[b].len);
		memcpy(cat, tok_ptr(t, (uint32_t)a), t->tok[a].len);
		memcpy(cat + t->tok[a].len, tok_ptr(t, (uint32_t)b), t->tok[b].len);
		r = tok_lookup(t, cat, t->tok[a].len + t->tok[b].len);
		if (r < 0) {
			rc = LOAD_ERR(L, "%s: model.merges[%d]: the merge of \"%.*s\" and \"%.*s\" is not in "
				      "model.vocab", L->name, k, (int)na, sa, (int)nb, sb);
			break;
		}
		if (pmap_get(&t->rank_of, (uint32_t)a, (uint32_t)b) == NO_RANK)
			tok_add_merge(t, (uint32_t)a, (uint32_t)b, (uint32_t)r);
		k++;
	}
	free(buf);
	free(cat);
	return rc;
}

static int load_model(struct tokenizer *t, const cJSON *root, struct load_ctx *L)
{
	const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model"), *v;
	static const char *const empty_keys[] = { "continuing_subword_prefix", "end_of_word_suffix" };
	int im;

	if (!cJSON_IsObject(model))
		return LOAD_ERR(L, "%s: model is %s, not an object", L->name, json_type_a(model));
	v = cJSON_GetObjectItemCaseSensitive(model, "type");
	if (v && !(cJSON_IsString(v) && !strcmp(v->valuestring, "BPE")))
		return LOAD_ERR(L, "%s: model.type is %s%s%s: only byte-level \"BPE\" is supported",
				L->name, cJSON_IsString(v) ? "\"" : "",
				cJSON_IsString(v) ? v->valuestring : json_type_a(v),
				cJSON_IsString(v) ? "\"" : "");
	if (!v && !cJSON_GetObjectItemCaseSensitive(model, "merges"))
		return LOAD_ERR(L, "%s: model.type is missing (and no model.merges): not a BPE model",
				L->name);
	v = cJSON_GetObjectItemCaseSensitive(model, "dropout");
	if (v && !cJSON_IsNull(v) && !(cJSON_IsNumber(v) && v->valuedouble == 0))
		return LOAD_ERR(L, "%s: model.dropout is set: BPE dropout is not supported", L->name);
	for (size_t k = 0; k < 2; k++) {
		v = cJSON_GetObjectItemCaseSensitive(model, empty_keys[k]);
		if (v && !cJSON_IsNull(v) && !(cJSON_IsString(v) && !v->valuestring[0]))
			return LOAD_ERR(L, "%s: model.%s is set: not supported by byte-level BPE", L->name,
					empty_keys[k]);
	}
	if (json_bool(model, "byte_fallback", 0) != 0)
		return LOAD_ERR(L, "%s: model.byte_fallback is set: a byte-fallback (sentencepiece-style) "
				"BPE is not byte-level BPE and is not supported", L->name);
	im = json_bool(model, "ignore_merges", 0);
	if (im < 0)
		return LOAD_ERR(L, "%s: model.ignore_merges is not a boolean", L->name);
	t->ignore_merges = im;
	if (load_vocab(t, model, L))
		return -1;
	return load_merges(t, model, L);
}

/* A ByteLevel pre-tokenizer step: checks its options; *use_regex is set from it. */
static int load_bytelevel(const cJSON *p, const char *key, int *use_regex, struct load_ctx *L)
{
	int aps = json_bool(p, "add_prefix_space", 0);

	if (aps != 0)
		return LOAD_ERR(L, "%s: %s.add_prefix_space is %s: only false is supported", L->name, key,
				aps < 0 ? "not a boolean" : "true");
	*use_regex = json_bool(p, "use_regex", 1);
	if (*use_regex < 0)
		return LOAD_ERR(L, "%s: %s.use_regex is not a boolean", L->name, key);
	return 0;
}

static int is_type(const cJSON *o, const char *type)
{
	const cJSON *t = cJSON_GetObjectItemCaseSensitive(o, "type");

	return cJSON_IsObject(o) && cJSON_IsString(t) && !strcmp(t->valuestring, type);
}

/* pretokenizers[i], a Split: its Regex (malloc'd into *rx), behavior Isolated, no invert. */
static int load_split(const cJSON *split, int i, char **rx, struct load_ctx *L)
{
	const cJSON *b = cJSON_GetObjectItemCaseSensitive(split, "behavior");
	const cJSON *r = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(split,
								"pattern"), "Regex");

	if (!is_type(split, "Split"))
		return LOAD_ERR(L, "%s: pre_tokenizer.pretokenizers[%d] is not a Split (only Splits, "
				"then a ByteLevel, are supported)", L->name, i);
	if (!cJSON_IsString(b) || strcmp(b->valuestring, "Isolated") ||
	    json_bool(split, "invert", 0) != 0)
		return LOAD_ERR(L, "%s: pre_tokenizer.pretokenizers[%d]: only behavior \"Isolated\" "
				"without invert is supported", L->name, i);
	if (!cJSON_IsString(r))
		return LOAD_ERR(L, "%s: pre_tokenizer.pretokenizers[%d].pattern.Regex is missing (a "
				"String pattern is not supported)", L->name, i);
	*rx = tok_xrealloc(NULL, strlen(r->valuestring) + 1);
	strcpy(*rx, r->valuestring);
	return 0;
}

/* One Split of a pattern written by hand (GPT-2, Llama 3, Qwen2), else the regexes by PCRE2. */
static int pick_pretok(struct tokenizer *t, char *const *rx, int n, struct load_ctx *L)
{
	char *e = n == 1 ? escape_crlf(rx[0]) : NULL;
	char why[256];
	int known = 1;

	if (e && !strcmp(e, PAT_GPT2))
		t->pretok = TOK_PRETOK_GPT2;
	else if (e && !strcmp(e, PAT_LLAMA3))
		t->pretok = TOK_PRETOK_LLAMA3;
	else if (e && !strcmp(e, PAT_QWEN2))
		t->pretok = TOK_PRETOK_QWEN2;
	else
		known = 0;
	free(e);
	if (known)
		return 0;
	t->splits = tok_splits_new((const char *const *)rx, n, why, sizeof(why));
	if (!t->splits)
		return LOAD_ERR(L, "%s: pre_tokenizer.%s", L->name, why);
	t->pretok = TOK_PRETOK_SPLITS;
	return 0;
}

static int load_pretok(struct tokenizer *t, const cJSON *root, struct load_ctx *L)
{
	const cJSON *p = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
	const cJSON *type = cJSON_GetObjectItemCaseSensitive(p, "type");
	const cJSON *list, *bl;
	char *rx[TOK_MAX_SPLITS];
	int use_regex, n, ret;

	if (!cJSON_IsObject(p) || !cJSON_IsString(type))
		return LOAD_ERR(L, "%s: pre_tokenizer is %s: a byte-level BPE needs a ByteLevel "
				"pre_tokenizer", L->name, cJSON_IsObject(p) ? "untyped" : json_type_a(p));
	if (!strcmp(type->valuestring, "ByteLevel")) {
		if (load_bytelevel(p, "pre_tokenizer", &use_regex, L))
			return -1;
		if (!use_regex)
			return LOAD_ERR(L, "%s: pre_tokenizer.use_regex is false: a ByteLevel pre-tokenizer "
					"without a split pattern is not supported", L->name);
		t->pretok = TOK_PRETOK_GPT2;
		return 0;
	}
	if (strcmp(type->valuestring, "Sequence"))
		return LOAD_ERR(L, "%s: pre_tokenizer.type is \"%s\": only ByteLevel, or a Sequence of a "
				"Split and a ByteLevel, is supported", L->name, type->valuestring);
	list = cJSON_GetObjectItemCaseSensitive(p, "pretokenizers");
	n = cJSON_GetArraySize(list);
	bl = cJSON_GetArrayItem(list, n - 1);
	if (!cJSON_IsArray(list) || n < 2 || n - 1 > TOK_MAX_SPLITS || !is_type(bl, "ByteLevel"))
		return LOAD_ERR(L, "%s: pre_tokenizer.pretokenizers: only [Split, ..., ByteLevel] (1 to %d "
				"Splits) is supported", L->name, TOK_MAX_SPLITS);
	if (load_bytelevel(bl, "pre_tokenizer.pretokenizers[last]", &use_regex, L))
		return -1;
	if (use_regex)
		return LOAD_ERR(L, "%s: pre_tokenizer.pretokenizers[%d].use_regex is true after a Split: "
				"not supported", L->name, n - 1);
	for (int i = 0; i < n - 1; i++) {
		if (load_split(cJSON_GetArrayItem(list, i), i, &rx[i], L)) {
			for (int j = 0; j < i; j++)
				free(rx[j]);
			return -1;
		}
	}
	ret = pick_pretok(t, rx, n - 1, L);
	for (int i = 0; i < n - 1; i++)
		free(rx[i]);
	return ret;
}

/* The ids special_tokens[name].ids of a TemplateProcessing, appended to out. */
static int template_ids(struct tokenizer *t, const cJSON *post, const char *name, int i,
			struct tok_ids *out, struct load_ctx *L)
{
	const cJSON *sp = cJSON_GetObjectItemCaseSensitive(post, "special_tokens");
	const cJSON *ids = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(sp, name),
							    "ids");
	const cJSON *v;

	if (!cJSON_IsArray(ids) || !cJSON_GetArraySize(ids))
		return LOAD_ERR(L, "%s: post_processor.single[%d] names \"%s\", which "
				"post_processor.special_tokens does not give ids", L->name, i, name);
	cJSON_ArrayForEach(v, ids) {
		long id = json_id(v);

		if (id < 0 || id >= t->vocab_size)
			return LOAD_ERR(L, "%s: post_processor.special_tokens[\"%s\"].ids holds %s, "
					"not an id in [0, %d)", L->name, name,
					cJSON_IsNumber(v) ? "a number" : json_type_a(v), t->vocab_size);
		ids_push(out, (uint32_t)id);
	}
	return 0;
}

/*
 * post_processor TemplateProcessing: its "single" template, special tokens around one sequence $A,
 * kept as the ids before and after a text (tokenizer_template); the object itself kept for saving.
 */
static int load_template(struct tokenizer *t, const cJSON *post, struct load_ctx *L)
{
	const cJSON *single = cJSON_GetObjectItemCaseSensitive(post, "single"), *it;
	int i = 0, n_seq = 0;

	if (!cJSON_IsArray(single))
		return LOAD_ERR(L, "%s: post_processor.single is %s, not an array", L->name,
				json_type_a(single));
	cJSON_ArrayForEach(it, single) {
		const cJSON *tok = cJSON_GetObjectItemCaseSensitive(it, "SpecialToken");
		const cJSON *seq = cJSON_GetObjectItemCaseSensitive(it, "Sequence");
		const cJSON *id = cJSON_GetObjectItemCaseSensitive(tok ? tok : seq, "id");

		if (!cJSON_IsObject(it) || !!tok == !!seq || !cJSON_IsString(id))
			return LOAD_ERR(L, "%s: post_processor.single[%d] is neither {\"SpecialToken\": "
					"{\"id\": NAME}} nor {\"Sequence\": {\"id\": \"A\"}}", L->name, i);
		if (seq) {
			if (strcmp(id->valuestring, "A") || n_seq++)
				return LOAD_ERR(L, "%s: post_processor.single[%d]: the single template holds "
						"one sequence, \"A\" (found \"%s\")", L->name, i,
						id->valuestring);
		} else if (template_ids(t, post, id->valuestring, i, n_seq ? &t->tmpl_post : &t->tmpl_pre,
					L)) {
			return -1;
		}
		i++;
	}
	if (!n_seq)
		return LOAD_ERR(L, "%s: post_processor.single holds no sequence {\"Sequence\": "
				"{\"id\": \"A\"}}", L->name);
	t->tmpl_json = cJSON_PrintUnformatted(post);
	if (!t->tmpl_json)
		return LOAD_ERR(L, "%s: out of memory", L->name);
	return 0;
}

static int load_rest(struct tokenizer *t, const cJSON *root, struct load_ctx *L)
{
	const cJSON *norm = cJSON_GetObjectItemCaseSensitive(root, "normalizer");
	const cJSON *dec = cJSON_GetObjectItemCaseSensitive(root, "decoder");
	const cJSON *post = cJSON_GetObjectItemCaseSensitive(root, "post_processor");
	const cJSON *type;

	if (norm && !cJSON_IsNull(norm)) {
		type = cJSON_GetObjectItemCaseSensitive(norm, "type");
		if (cJSON_IsString(type) && !strcmp(type->valuestring, "NFC")) {
			const char *w = "normalizer NFC is not applied (text already in NFC encodes "
					"identically)";

			t->warning = tok_xrealloc(NULL, strlen(w) + 1);
			strcpy(t->warning, w);
		} else if (!(cJSON_IsString(type) && !strcmp(type->valuestring, "Sequence") &&
			     !cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(norm, "normalizers")))) {
			return LOAD_ERR(L, "%s: normalizer.type is %s%s%s: only no normalizer is supported",
					L->name, cJSON_IsString(type) ? "\"" : "",
					cJSON_IsString(type) ? type->valuestring : json_type_a(type),
					cJSON_IsString(type) ? "\"" : "");
		}
	}
	if (is_type(post, "TemplateProcessing") && load_template(t, post, L))
		return -1;
	if (dec && !cJSON_IsNull(dec)) {
		type = cJSON_GetObjectItemCaseSensitive(dec, "type");
		if (!cJSON_IsString(type) || strcmp(type->valuestring, "ByteLevel"))
			return LOAD_ERR(L, "%s: decoder.type is %s%s%s: only ByteLevel is supported",
					L->name, cJSON_IsString(type) ? "\"" : "",
					cJSON_IsString(type) ? type->valuestring : json_type_a(type),
					cJSON_IsString(type) ? "\"" : "");
	}
	return 0;
}

struct tokenizer *tokenizer_parse(const char *json, size_t len, const char *name, char *err,
				  size_t errlen)
{
	struct load_ctx L = { name, err, errlen };
	struct tokenizer *t;
	cJSON *root = cJSON_ParseWithLength(json, len);

	if (!root) {
		const char *at = cJSON_GetErrorPtr();
		long off = at && at >= json && at <= json + len ? (long)(at - json) : -1;

		snprintf(err, errlen, "%s: not valid JSON (near byte %ld)", name, off);
		return NULL;
	}
	t = tok_alloc();
	if (!cJSON_IsObject(root)) {
		snprintf(err, errlen, "%s: not a JSON object", name);
		goto fail;
	}
	if (load_added(t, root, &L) || load_model(t, root, &L) || load_pretok(t, root, &L) ||
	    load_rest(t, root, &L) || tok_finish_build(t, name, err, errlen))
		goto fail;
	cJSON_Delete(root);
	return t;
fail:
	cJSON_Delete(root);
	tokenizer_free(t);
	return NULL;
}

struct tokenizer *tokenizer_load(const char *path, char *err, size_t errlen)
{
	FILE *fp = fopen(path, "rb");
	struct tokenizer *t;
	char *buf;
	long n;

	if (!fp) {
		snprintf(err, errlen, "%s: %s", path, strerror(errno));
		return NULL;
	}
	if (fseek(fp, 0, SEEK_END) || (n = ftell(fp)) < 0 || fseek(fp, 0, SEEK_SET)) {
		snprintf(err, errlen, "%s: cannot read: %s", path, strerror(errno));
		fclose(fp);
		return NULL;
	}
	buf = tok_xrealloc(NULL, (size_t)n + 1);
	if (fread(buf, 1, (size_t)n, fp) != (size_t)n) {
		snprintf(err, errlen, "%s: read error", path);
		free(buf);
		fclose(fp);
		return NULL;
	}
	fclose(fp);
	buf[n] = 0;
	t = tokenizer_parse(buf, (size_t)n, path, err, errlen);
	free(buf);
	return t;
}

/* A token's spelling in model.vocab: the byte-level characters, or the string itself. */
static char *vocab_string(const struct tokenizer *t, uint32_t id)
{
	const struct token *k = &t->tok[id];
	char *s;

	if (k->kind == TK_BYTES)
		return bytes_to_visible(tok_ptr(t, id), k->len);
	s = tok_xrealloc(NULL, k->len + 1);
	memcpy(s, tok_ptr(t, id), k->len);
	s[k->len] = 0;
	return s;
}

static cJSON *bytelevel_json(bool add_prefix_space, bool trim_offsets, bool use_regex)
{
	cJSON *o = cJSON_CreateObject();

	cJSON_AddStringToObject(o, "type", "ByteLevel");
	cJSON_AddBoolToObject(o, "add_prefix_space", add_prefix_space);
	cJSON_AddBoolToObject(o, "trim_offsets", trim_offsets);
	cJSON_AddBoolToObject(o, "use_regex", use_regex);
	return o;
}

static cJSON *split_json(const char *rx)
{
	cJSON *split = cJSON_CreateObject(), *pat = cJSON_CreateObject();

	cJSON_AddStringToObject(split, "type", "Split");
	cJSON_AddStringToObject(pat, "Regex", rx);
	cJSON_AddItemToObject(split, "pattern", pat);
	cJSON_AddStringToObject(split, "behavior", "Isolated");
	cJSON_AddBoolToObject(split, "invert", false);
	return split;
}

static cJSON *tokenizer_to_json(const struct tokenizer *t)
{
	cJSON *root = cJSON_CreateObject(), *added, *model, *vocab, *merges, *pre;

	cJSON_AddStringToObject(root, "version", "1.0");
	cJSON_AddNullToObject(root, "truncation");
	cJSON_AddNullToObject(root, "padding");
	added = cJSON_AddArrayToObject(root, "added_tokens");
	for (int k = 0; k < t->n_added; k++) {
		const struct added *a = &t->added[k];
		cJSON *o = cJSON_CreateObject();
		char *s = vocab_string(t, a->id);

		cJSON_AddNumberToObject(o, "id", a->id);
		cJSON_AddStringToObject(o, "content", s);
		cJSON_AddBoolToObject(o, "single_word", a->single_word);
		cJSON_AddBoolToObject(o, "lstrip", a->lstrip);
		cJSON_AddBoolToObject(o, "rstrip", a->rstrip);
		cJSON_AddBoolToObject(o, "normalized", a->normalized);
		cJSON_AddBoolToObject(o, "special", a->special);
		cJSON_AddItemToArray(added, o);
		free(s);
	}
	cJSON_AddNullToObject(root, "normalizer");
	if (t->pretok == TOK_PRETOK_GPT2) {
		pre = bytelevel_json(false, true, true);
	} else {
		cJSON *list;
		int n = t->pretok == TOK_PRETOK_SPLITS ? tok_splits_count(t->splits) : 1;

		pre = cJSON_CreateObject();
		cJSON_AddStringToObject(pre, "type", "Sequence");
		list = cJSON_AddArrayToObject(pre, "pretokenizers");
		for (int i = 0; i < n; i++) {
			const char *rx = t->pretok == TOK_PRETOK_SPLITS ? tok_splits_pattern(t->splits, i) :
					 t->pretok == TOK_PRETOK_LLAMA3 ? PAT_LLAMA3 : PAT_QWEN2;

			cJSON_AddItemToArray(list, split_json(rx));
		}
		cJSON_AddItemToArray(list, bytelevel_json(false, true, false));
	}
	cJSON_AddItemToObject(root, "pre_tokenizer", pre);
	cJSON_AddItemToObject(root, "post_processor", t->tmpl_json ? cJSON_Parse(t->tmpl_json) :
			      bytelevel_json(true, false, true));
	cJSON_AddItemToObject(root, "decoder", bytelevel_json(true, true, true));
	model = cJSON_AddObjectToObject(root, "model");
	cJSON_AddStringToObject(model, "type", "BPE");
	cJSON_AddNullToObject(model, "dropout");
	cJSON_AddNullToObject(model, "unk_token");
	cJSON_AddNullToObject(model, "continuing_subword_prefix");
	cJSON_AddNullToObject(model, "end_of_word_suffix");
	cJSON_AddBoolToObject(model, "fuse_unk", false);
	cJSON_AddBoolToObject(model, "byte_fallback", false);
	cJSON_AddBoolToObject(model, "ignore_merges", t->ignore_merges);
	vocab = cJSON_AddObjectToObject(model, "vocab");
	for (int id = 0; id < t->vocab_size; id++) {
		char *s;

		if (t->tok[id].kind == TK_NONE || !t->tok[id].in_vocab)
			continue;
		s = vocab_string(t, (uint32_t)id);
		cJSON_AddNumberToObject(vocab, s, id);
		free(s);
	}
	merges = cJSON_AddArrayToObject(model, "merges");
	for (int r = 0; r < t->n_merges; r++) {
		char *a = vocab_string(t, t->merges[r][0]), *b = vocab_string(t, t->merges[r][1]);
		size_t na = strlen(a), nb = strlen(b);
		char *m = tok_xrealloc(NULL, na + nb + 2);

		memcpy(m, a, na);
		m[na] = ' ';
		memcpy(m + na + 1, b, nb + 1);
		cJSON_AddItemToArray(merges, cJSON_CreateString(m));
		free(a);
		free(b);
		free(m);
	}
	return root;
}

int tokenizer_save(const struct tokenizer *t, const char *path, char *err, size_t errlen)
{
	cJSON *root = tokenizer_to_json(t);
	char *text = cJSON_Print(root);
	size_t n = text ? strlen(text) : 0, plen = strlen(path);
	char *tmp = tok_xrealloc(NULL, plen + 5);
	FILE *fp;
	int rc = -1;

	cJSON_Delete(root);
	if (!text) {
		snprintf(err, errlen, "%s: out of memory formatting the JSON", path);
		free(tmp);
		return -1;
	}
	memcpy(tmp, path, plen);
	memcpy(tmp + plen, ".tmp", 5);
	fp = fopen(tmp, "wb");
	if (!fp) {
		snprintf(err, errlen, "%s: %s", tmp, strerror(errno));
	} else if (fwrite(text, 1, n, fp) != n || fputc('\n', fp) == EOF || fflush(fp) ||
		   fsync(fileno(fp))) {
		snprintf(err, errlen, "%s: write error: %s", tmp, strerror(errno));
		fclose(fp);
		unlink(tmp);
	} else if (fclose(fp)) {
		snprintf(err, errlen, "%s: write error: %s", tmp, strerror(errno));
		unlink(tmp);
	} else if (rename(tmp, path)) {
		snprintf(err, errlen, "%s: cannot rename %s: %s", path, tmp, strerror(errno));
		unlink(tmp);
	} else {
		rc = 0;
	}
	free(text);
	free(tmp);
	return rc;
}
